"""Page for ``fit_overhead.json``: ``autobatch.fit``'s own cost over a plain PyTorch loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, listing, table, verdict

written_for = "c8aafb043764"  # the commentary was checked against these results

TEMPLATE = """\
What `autobatch.fit` costs on top of the 10-line loop a user would write (permute, index,
forward, backward, step), at the same fixed batch and number of steps.

## Protocol

Each case trains a freshly seeded copy of one model for the same steps at a fixed B, six ways,
alternating in rounds ({rounds} rounds, the order rotating, after a warm-up round), one torch
thread, {timer}:

- **plain**: the user's loop; **control**: the same loop timed as a variant (the harness's noise);
- **off**: `fit(policy="fixed", lr_scaling="none", gns_method="off")`: the loop's machinery only;
- **micro**: the same with the noise-scale estimator on (the default `gns_method`, measuring every
  8th step: the default `gns_every`);
- **micro, auto interval**: `gns_every="auto"`, the measuring interval chosen so that the split
  steps add at most 5% (`gns_overhead`), calibrated from the run's own step times;
- **per_example**: with exact per-example norms.

A ratio is the median over rounds of variant time / plain time in the same round. With the
estimator on, a step is one micro-batch unless memory needs more; the small batches are measured
on each of the first ~20 steps (the estimator's first window), then on every 8th step, whose
single micro-batch is split in two for it; the whole step's gradient norm is read every step.

```bash
python -m benchmarks.fit_overhead     # ~{minutes:.0f} minutes here (torch {torch}, load average {load_before} before, {load_after} after)
```

## Results

{table}

## Against the targets

{verdicts}.

Where the time goes on the tiny CNN at B=16 (a plain step is 0.75-0.85 ms; per-step timers
inside a copy of the loop, 3,000 steps, one thread): with the estimator off, fit adds about
90-100 us per step, spread over a dozen pieces of 3-20 us each (the LR assembly, the sample
indices, the loss read, the step record, the optimizer call) and over the forward and backward
themselves, which run 10-20 us slower after fit's Python work has pushed them out of the CPU's
caches. This round cut what could be cut without changing results: estimator reads memoized
per update, no median sort per step, no idle tensor-hook dict left on the parameters, no no-op
device moves, records built without validation (from 18 to 9 us per step), sizes without
`Tensor.__len__`. Those gains are of the size of this machine's drift between reruns (the
plain step itself moved from 0.75 to 0.85 ms between two runs of this benchmark an hour
apart), so the ratios above barely show them. Taking a measured step's micro-batch norms from
differences of the flat gradient instead of per-parameter hooks saved 0.3 ms per measured step
(5% of a run's CPU time) but was reverted: equal to the hooks up to rounding, that rounding
changed the default policy's batch-size trajectory on the main job (seed 0: 4,692 steps and
93.3% against 3,664 and 95.3%; seed 3 lost the run at LR 0.4), so every recorded benchmark
would have needed rerunning. With the
estimator on, reading the whole step's gradient norm costs about 45 us per step and a split
step about one more plain step; measured every 8th step that is the 1.36x above.
`gns_every="auto"` measures every 32nd step on this model (the estimator's memory stretched
to hold as many measurements). Reading the whole-step norm only on measured steps was tried
and rejected: 6% faster on this model, but a policy then grew the batch more slowly (B=72 in
201 steps against B=80 in 145 on a regression problem).

Run lengths. The estimator's first window (20 steps, all measured) is a fixed cost, so the
cases with a target now run 500-600 steps (4% or less of them in the first window; a short
training run: the MNIST-1D main job takes 2,000-3,700 steps). Until this round tinyformer-64,
cnn-256 and mlp1m-256 ran 100-160 steps, where the first window was 13-20% of the steps: at
120 steps mlp1m-256 measured 1.046x with the estimator on, at 600 steps 1.031x (1.018x in a
3-round check), and with `gns_every="auto"` 1.040x then, 1.016x now. The 1.031x against the
1.03 target is within this harness's noise: in the same rounds `control` (the plain loop
again) measured 0.993x and `off` 0.986x. charlm-32 (no target) stays at 100 steps to keep the
benchmark near 15 minutes. On models whose step is tens of milliseconds the estimator costs
1-3% at the default interval.
"""


def render(data: Any, source: Path) -> Page:
    cases, targets = data["cases"], data["targets"]
    variants = ["control", "off", "micro", "micro_auto", "per_example"]

    def cell(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}x"

    rows = [[name, f"{c['params']:,}", str(c["batch_size"]), f"{c['steps']:,}", f"{c['plain_ms_per_step']:.2f} ms",
             *[cell(c["ratio"].get(v)) for v in variants]] for name, c in cases.items()]
    tbl = table(["case", "params", "B", "steps", "plain step", "control", "off", "micro (on)", "micro, auto interval",
                 "per-example"], rows, "lrrrrrrrrr")
    checks = [(case, variant, target, cases[case]["ratio"].get(variant))
              for case, per in targets.items() for variant, target in per.items() if case in cases]
    verdicts = listing([f"{case} {variant} {cell(got)} (target <= {target}x) {verdict(got is not None and got <= target)}"
                        for case, variant, target, got in checks])
    met = sum(got is not None and got <= target for *_, target, got in checks)
    body = TEMPLATE.format(rounds=data["rounds"], timer=data["timer"], minutes=data["seconds"] / 60,
                           torch=data["torch"], load_before=f"{data['load_average_before'][0]:.1f}",
                           load_after=f"{data['load_average_after'][0]:.1f}", table=tbl, verdicts=verdicts)
    summary = f"fit over a plain loop: {met} of {len(checks)} targets met"
    return Page("fit overhead over a plain loop", summary, body, written_for)
