"""Page for ``gns_overhead.json``: the training step's cost with the estimator on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, listing, num, span, table, times, verdict

written_for = "21544aa7b6ac"  # the commentary was checked against these results

# Targets of the estimator's issue (#2): step time with the estimator over the same step without.
MICRO_TARGET = 1.05
PER_EXAMPLE_TARGET = 1.5

TEMPLATE = """\
What measuring the noise scale adds to a training step, on CPU.

## Protocol

One SGD step of batch B is timed in these variants, each alternated with its baseline in one
process, {rounds} rounds, the order rotating each round:

- `micro`: B as {k} accumulated micro-batches, with `MicroBatchNormCollector` and the estimator
  update, over the same step without them (`plain step (k={k})`);
- `control`: that baseline timed against itself: how far the harness alone strays from 1;
- `per-example`: one backward over B with `PerExampleNormCollector` (+ the step's norm and the
  update), over one plain backward (`plain step (k=1)`);
- `torch.func vmap`: per-example gradients by `vmap(grad)`, their norms and their mean as the
  step's gradient, over the same plain step: the generic alternative to the closed forms.

Times are CPU time of the single compute thread (other jobs on the machine do not inflate
it); each ratio is the median over rounds of the variant's time over its baseline's in the
same round.

```bash
python benchmarks/gns_overhead.py     # {seconds:.0f} s in the recorded run ({threads} thread, torch {torch})
```

## Results

{table}

## Against the targets

- Micro-batch mode <= {micro_target}: {micro_verdicts}.
- Per-example mode <= {pe_target}: {pe_verdicts}.

The control column reads {control_span}: the harness alone moves by a few percent, the size
of the micro-batch target itself, so one run does not settle micro mode against it; repeated
runs on this shared machine moved each micro ratio by a few points, and the target was met
only in some of them. The per-example mode is cheapest on the largest model ({big}: {big_pe})
and dearest on the small ones ({small_pe}); presumably the hooks' fixed per-layer cost weighs
more where each layer holds little work (not profiled). On those small models `torch.func`
vmap ({small_vmap}) is no slower than the closed forms, while on {big} it is {big_vmap}.
"""


def render(data: Any, source: Path) -> Page:
    meta, models = data["meta"], data["models"]
    k = {m["micro_batches"] for m in models.values()}
    k_label = "/".join(str(x) for x in sorted(k))
    rows = [
        [name, num(m["params"]), m["batch_size"], f"{m['median_ms']['plain_k']:.1f} ms",
         times(m["ratio"]["control"], 3), times(m["ratio"]["micro"], 3),
         f"{m['median_ms']['plain_1']:.1f} ms", times(m["ratio"]["per_example"]),
         times(m["ratio"]["vmap"], 1)]
        for name, m in models.items()
    ]
    tbl = table(["model", "params", "B", f"plain step (k={k_label})", "control", "micro",
                 "plain step (k=1)", "per-example", "torch.func vmap"], rows, "lrrrrrrrr")

    def verdicts(key: str, target: float, digits: int) -> tuple[str, int]:
        parts = [f"{name} {times(m['ratio'][key], digits)} {verdict(m['ratio'][key] <= target)}"
                 for name, m in models.items()]
        return listing(parts), sum(m["ratio"][key] <= target for m in models.values())

    micro_v, micro_met = verdicts("micro", MICRO_TARGET, 3)
    pe_v, pe_met = verdicts("per_example", PER_EXAMPLE_TARGET, 2)
    by_size = sorted(models.items(), key=lambda kv: kv[1]["params"])
    big_name, big = by_size[-1]
    small = by_size[:-1]
    body = TEMPLATE.format(
        rounds=meta["rounds"], k=k_label, seconds=meta["seconds"], threads=meta["threads"],
        torch=meta["torch"], table=tbl, micro_target=times(MICRO_TARGET), pe_target=times(PER_EXAMPLE_TARGET, 1),
        micro_verdicts=micro_v, pe_verdicts=pe_v,
        control_span=span((m["ratio"]["control"] for m in models.values()), lambda x: times(x, 3)),
        big=f"the {num(big['params'])}-parameter {big_name}", big_pe=times(big["ratio"]["per_example"]),
        small_pe=listing([f"{n} {times(m['ratio']['per_example'])}" for n, m in small]),
        small_vmap=listing([f"{n} {times(m['ratio']['vmap'], 1)}" for n, m in small]),
        big_vmap=times(big["ratio"]["vmap"], 1),
    )
    n = len(models)
    summary = (f"micro-batch mode {span((m['ratio']['micro'] for m in models.values()), times)} "
               f"(target {times(MICRO_TARGET)}: met on {micro_met} of {n} models), per-example mode "
               f"{span((m['ratio']['per_example'] for m in models.values()), times)} "
               f"(target {times(PER_EXAMPLE_TARGET, 1)}: met on {pe_met} of {n})")
    return Page("Estimator overhead", summary, body, written_for)
