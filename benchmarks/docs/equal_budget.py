"""Page for ``equal_budget.json``: fixed B0 against the default adaptive fit at equal epochs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, listing, num, table, times, verdict

written_for = "8b82bb91db02"  # the commentary was checked against these results

TEMPLATE = """\
The comparison a user makes first (issue 11): their usual run (a fixed batch B0, their base
LR, the same number of epochs) against `fit` with its defaults. Is the model as good, and in
how many optimizer steps?

## Protocol

Per task, base LR in {{tuned/4, tuned/2, tuned}} and seed (the model's initialisation; seeds
0, 1 and 2), two runs alternating in one process on 1 CPU thread: `policy="fixed"` with the
estimator off and no LR scaling, and the default `fit` (policy `budget`: the noise scale
bounded by the batch the LR can follow, the linear LR rule, LR factor at most 2, the loss-spike
guard, and once the guard has cut, from half the budget on, the batch annealed to 8x what the
LR can follow). The machine had 2 CPU cores shared with other jobs, so wall times are noisy.

{tasks}

```bash
python -m benchmarks.equal_budget --task mnist1d
python -m benchmarks.equal_budget --task charlm
python -m benchmarks.equal_budget --task charlm-long
```

## Results

{tables}

## Against the issue's Must show

Per task x base LR: the adaptive mean final metric within {acc_mean} points (accuracy) or
{loss_mean} (loss) of fixed B0; no seed more than {acc_seed} points (accuracy) or {loss_seed}
(loss) behind its fixed-B0 twin; at most {steps}x the steps (mean of the per-seed ratios).

{verdicts}

{commentary}
"""

COMMENTARY = """\
## Reading

Written for one run; see the note at the top if the figures changed since.

- **mnist1d, base LR 0.05 (tuned/4).** The guard never cut: B doubled with the LR (B 64, LR
  0.1) and the runs ended 0.4-1.0 points *above* fixed B0 in 0.53-0.56x the steps. A larger
  LR at the same temperature `LR/B` is what an untuned LR needed.
- **mnist1d, base LR 0.1 and 0.2.** The doubled LR was unstable at some point on 5 of 6 runs
  (one guard cut each; the factor went back to 1 and B to B0). From half the budget on, with
  the loss calm, those runs annealed: B grew to 256 (8 x B0) at the base LR, an LR decay by
  batch, which is where 0.47-0.53x the steps come from. The one run without a cut (LR 0.1,
  seed 2) kept B <= 64 and took 0.59x.
- **The LR 0.2 row passes on the letter only.** Fixed B0 seed 1 blew up at about epoch 19
  and ended at 85.5% (the same seed ended at 97.1% in an earlier run of older code: at this LR
  a rounding difference decides whether a run recovers); without that pair the adaptive runs
  are 0.47 and 1.20 points behind (mean -0.84). The anneal's settings were chosen on seeds
  3-7, not on these (same code, fixed B0 vs default): at LR 0.2 mean -0.11 points (seeds 3-7:
  -0.07, +0.13, -0.80, 0.00, +0.20) in 0.53x the steps; at LR 0.1 -0.27 in 0.48x. Pooling
  seeds 0 and 2-7 at LR 0.2 gives -0.32: at the tuned LR the anneal costs about 0.3 points
  for half the steps, within the 0.5 limit but not by much. `BudgetPolicy(anneal_after=None)`
  keeps the accuracy instead (seeds 3-7: +0.01 points in 0.96x the steps).
- **Why an anneal, and why only then.** At the stability edge the LR cannot follow the batch,
  so the only steps left to save come from a batch that outgrows the LR. Fixed schedules
  tried first (LR 0.2, seeds 0, 1, 2, means; fixed B0 gives 96.9, 85.5 and 96.9% with this
  code): B = 64 from the start, 94.4% (at LR 0.4 one seed diverged); B0 then 64 from epoch 8,
  96.4%; then 128 from epoch 16, 96.6%; doubling at epochs 10, 20 and 30, 96.4%; then 256
  from epoch 20: 97.3% and 96.9% on seeds 0 and 2, and 54.6% on seed 1, whose loss had blown
  up at epoch 19: the 8x batch froze a half-recovered model (at B0 it ends at 85.5%). Hence as
  late as the step target allows, and only while the loss is calm.
  Annealing every run, cut or not, cost 2-3 points at LR 0.05, where the LR was too small
  to begin with (see `autobatch/policies/budget.py`).
- **charlm-long** (AdamW, 12 epochs on the whole text, B0 = 16 and LR 1.5e-3 from the
  long-horizon sweep, `benchmarks/long_lm.py`): every row met with room. B grew to 32 with
  the LR doubled after the estimator's first window and stayed there; at tuned/4 and tuned/2
  the doubled LR is simply better (-3.0% and -1.1% loss against fixed B0), at the tuned LR
  +0.28% (worst seed +0.44%), in 0.53-0.56x the steps. No guard cut, so no anneal (it
  needs a cut). Rerun at the commit above, every figure reproduced the previous record,
  made while the anneal was being written.
- **charlm (6 epochs, B0 = 32): missed, and no schedule we tried would meet it.** Every row was
  rerun at one commit: the adaptive rows reproduced the previous record exactly, the fixed
  rows (then from an older commit, whose steps were split in two micro-batches) moved by up
  to 0.013 nats, which took the tuned-LR row from +1.34% to +1.40%. At this horizon the loss still falls fast at the end and the
  noise scale stays near B0 (B grew to 48-64): steps, not samples, bind. On seed 0 at the
  tuned LR (fixed B0: 1.606 with the code of these trials, 1.608 now) every larger batch at equal samples lost: fixed B = 64 at LR 3e-3,
  4.2e-3 and 6e-3: 1.752, 1.786, 1.947 (+9% or worse); B = 56 at 5.25e-3: 1.836; B0 then
  4x or 8x from half the budget: 1.716 (+6.9%) and 1.778 (+10.7%). So 0.6x the steps within
  1% of B0's loss is out of reach here; the default stays within 0.6-1.4% (means per LR) in 0.76-0.80x.
  The same model trained long enough for the noise scale to grow is the charlm-long task.
- Wall times are indicative only: the machine's 2 cores may be shared with other jobs.
"""


def _rows(data: Any, task: str) -> dict[float, dict[str, list[dict[str, Any]]]]:
    out: dict[float, dict[str, list[dict[str, Any]]]] = {}
    for r in data["runs"]:
        if r["task"] == task:
            out.setdefault(r["lr"], {}).setdefault(r["method"], []).append(r)
    return dict(sorted(out.items()))


def row_verdict(fixed: list[dict[str, Any]], adaptive: list[dict[str, Any]], higher: bool,
                criteria: dict[str, float]) -> dict[str, Any]:
    """The Must-show checks of one task x base-LR row over the seeds both methods ran.

    Accuracy: differences in points; loss: relative excess of the adaptive loss."""
    by_seed = {r["seed"]: r for r in fixed}
    pairs = [(by_seed[a["seed"]], a) for a in adaptive if a["seed"] in by_seed]
    if not pairs:
        return {"seeds": 0}
    if higher:
        gaps = [a["metric"] - f["metric"] for f, a in pairs]  # >0 better
        mean_gap = statistics.mean(a["metric"] for _, a in pairs) - statistics.mean(f["metric"] for f, _ in pairs)
        mean_ok = mean_gap >= -criteria["acc_mean_points"]
        seed_ok = min(gaps) >= -criteria["acc_seed_points"]
    else:
        gaps = [f["metric"] / a["metric"] - 1 for f, a in pairs]  # >0 better (lower loss)
        mean_gap = statistics.mean(f["metric"] for f, _ in pairs) / statistics.mean(a["metric"] for _, a in pairs) - 1
        mean_ok = mean_gap >= -criteria["loss_mean_rel"]
        seed_ok = min(gaps) >= -criteria["acc_seed_points"] / 100
    ratios = [a["steps"] / f["steps"] for f, a in pairs]
    steps_ok = statistics.mean(ratios) <= criteria["steps_ratio"]
    return {"seeds": len(pairs), "mean_gap": mean_gap, "worst_gap": min(gaps), "ratios": ratios,
            "mean_ok": mean_ok, "seed_ok": seed_ok, "steps_ok": steps_ok,
            "all_ok": mean_ok and seed_ok and steps_ok}


def render(data: Any, source: Path) -> Page:
    crit = data["criteria"]
    tasks_text, tables, verdict_lines = [], [], []
    met = total = 0
    for task, meta in data["tasks"].items():
        higher = meta.get("higher_is_better", task == "mnist1d")
        tasks_text.append(f"- `{task}`: {meta['epochs']:g} epochs, B0 = {meta.get('initial_batch_size', 32)}, "
                          f"tuned LR {meta['tuned_lr']:g}, metric {meta.get('metric', 'final metric')}"
                          + (f", {meta['charlm_chars']:,} characters of text" if meta.get("charlm_chars") else "")
                          + f" (commit `{meta.get('commit', '?')}`"
                          + (f"; {meta['code_note']}" if meta.get("code_note") else "") + ").")
        rows = []
        for lr, by_method in _rows(data, task).items():
            fixed, adaptive = by_method.get("fixed", []), by_method.get("adaptive", [])
            for f in sorted(fixed, key=lambda r: r["seed"]):
                a = next((x for x in adaptive if x["seed"] == f["seed"]), None)
                rows.append([f"{lr:g}", f["seed"], num(f["metric"], 2 if higher else 3),
                             num(a["metric"], 2 if higher else 3) if a else "-", num(f["steps"]),
                             num(a["steps"]) if a else "-", times(a["steps"] / f["steps"]) if a else "-",
                             num(a["samples"]) if a else "-", f"{f['wall_s']:.0f} / {a['wall_s']:.0f}" if a else "-",
                             a["max_batch_size"] if a else "-", a["guard_spikes"] if a else "-"])
            v = row_verdict(fixed, adaptive, higher, crit)
            if not v["seeds"]:
                continue
            total += 1
            met += v["all_ok"]
            unit = (lambda x: f"{x:+.2f} points") if higher else (lambda x: f"loss {-100 * x:+.2f}% vs fixed")
            verdict_lines.append(
                f"- {task}, LR {lr:g} ({v['seeds']} seeds): mean {unit(v['mean_gap'])} {verdict(v['mean_ok'])}; "
                f"worst seed {unit(v['worst_gap'])} {verdict(v['seed_ok'])}; steps "
                f"{times(statistics.mean(v['ratios']))} (seeds {listing([times(r) for r in v['ratios']])}) "
                f"{verdict(v['steps_ok'])}.")
        tables.append(f"### {task}\n\n" + table(
            ["base LR", "seed", "fixed B0", "adaptive", "fixed steps", "adaptive steps", "steps ratio",
             "adaptive samples", "wall s (fixed / adaptive)", "adaptive max B", "guard cuts"],
            rows, "rrrrrrrrrrr"))
    body = TEMPLATE.format(
        tasks="\n".join(tasks_text), tables="\n\n".join(tables), acc_mean=crit["acc_mean_points"],
        loss_mean=f"{100 * crit['loss_mean_rel']:g}%", acc_seed=crit["acc_seed_points"],
        loss_seed=f"{crit['acc_seed_points']:g}%", steps=crit["steps_ratio"],
        verdicts="\n".join(verdict_lines) or "No complete row yet.", commentary=COMMENTARY)
    summary = f"default fit vs fixed B0 at equal epochs: {met} of {total} task x LR rows meet all three checks"
    return Page("Equal budget: default fit against fixed B0", summary, body, written_for)
