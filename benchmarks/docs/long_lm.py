"""Page for ``long_lm.json``: a long language-model run, adaptive and ramped batches against a
tuned fixed-B sweep, to the best fixed B's final loss."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, listing, num, sig, table, times, verdict

written_for = "928b25dbbd2f"  # the commentary was checked against these results

TEMPLATE = """\
The kind of run where practitioners report gains from growing the batch (issue 11): a
language model trained long enough that the gradient noise scale grows >= 10x. Does the
adaptive default reach the loss of the best tuned fixed batch in fewer steps, without more
samples and in less time?

## Protocol

- Task: `charlm` (character transformer, {model}) on the whole standard-library text
  ({chars:,} characters requested), {optimizer}, {epochs:g} epochs for every run (the same
  sample budget), {evals} held-out evaluations per run evenly spaced in samples plus one at
  the end. Wall time excludes evaluation.
- Noise-scale check (pilot): fixed B = {b0} with the micro-batch estimator on, seed 0; the
  growth is the median `B_simple` of the last 10% of ready steps over that of the first 5%.
- Fixed B in {{{sizes}}}: `policy="fixed"`, estimator off, no LR scaling (each baseline at
  its fastest settings). LR per size from a x2 grid of 3 LRs (seed 0, scored by final loss),
  widened until the best is interior; the chosen LR re-run on seeds {seeds}.
- `ramp`: batch warm-up as Megatron and OLMo do it, B x2 at epochs {milestones} ({b0} ->
  {bmax}), at B = {b0}'s tuned LR with the default fit's LR rule for AdamW (`linear`, the
  factor capped at `max_lr_factor` = 2), estimator off.
- `ramp-constant-lr`: the same ramp with `lr_scaling="none"` (the LR stays at B = {b0}'s, as
  Megatron's batch ramp-up leaves it).
- `default`: `autobatch.fit` with its defaults (policy `budget`: linear LR rule, factor <= 2,
  so under a sample budget B <= 2 x B0) from B0 = {b0} at its tuned LR; `gns`: the same with
  `policy="gns"`. Seeds {seeds}.
- Final loss: the held-out loss at the budget. The Must show allows {samples_ratio}x the
  samples, so the non-fixed arms run on to {overrun:g}x the budget (their policies do not
  depend on its size); the fixed arms stop at it.
- Target: the best fixed B's mean final loss over seeds {seeds}. Every run's steps, samples
  and wall time to first reach it are interpolated (linearly in loss) between evaluations,
  and divided by the best fixed B's median steps, samples and wall time over its whole run.
- Machine: {machine}. Wall times are indicative only. Commit `{commit}` (`-dirty`: the
  benchmark's own files were being written; `autobatch/` was unchanged).

```bash
python -m benchmarks.long_lm                 # all phases (42 runs, ~40 min), resumable
python -m benchmarks.long_lm --phase pilot   # the noise-scale check alone
```

## Noise-scale growth

{pilot}

Where the growth happens: median `B_simple` of the pilot runs' thinned trace (about every 1%
of the steps) by range of epochs:

{by_epoch}

## LR tuning (seed 0, final loss)

{tuning}

## Results

Target: {best}'s mean final loss {target}; its median run: {ref_steps} steps,
{ref_samples} samples, {ref_wall} s.

{results}

Per seed, the arms that start at B = {b0} (ratios to the same reference; "B_simple growth" is
the in-run estimate's growth, for the arms that run the estimator, over the steps up to the
budget):

{per_seed}

In the first table, final loss, max B, steps, samples and wall time are at the budget (medians
over seeds). The
"to target" columns are medians over seeds of (figure when the target was first reached) /
(best fixed B's median over its run); a seed that never reached it counts as infinite, and
"reached" counts the seeds that did.

## Against the issue's Must show

The adaptive default reaches the best fixed B's final loss in <= {steps_ratio}x its steps,
at <= {samples_ratio}x its samples and in less wall time, median of 3 seeds.

{verdicts}

{commentary}
"""

COMMENTARY = """\
## Reading

Written for one run; see the note at the top if the figures changed since.

- Noise scale: `B_simple` (in sequences of 64 characters) grows 8.1x at LR 2e-3 and 13.0x
  at 1e-3 by the first-5% / last-10% measure; the issue's >= 10x holds at the lower LR only.
  Most of the growth is in the first epoch (to 30 by epoch 1, then 40-70 for the remaining
  11 epochs), so the measure depends on how short the early window is: the default's own
  in-run estimate, whose first 5% of steps covers fewer samples, grows 29-34x.
- The tuned sweep says the sample budget binds: at 12 epochs the smallest batch is best
  (B=16: 1.3126; B=128: 1.6079), and the tuned LR barely moves with B (1.5e-3 at 16, 32 and
  128, 2e-3 at 64): at equal samples Adam's LR did not follow the batch, linearly or by the
  square root. Every grid minimum is interior.
- The default (`budget`) grows B from 16 to 32 after 110-280 steps, at twice the LR (the
  linear rule at its cap of 2), and ends at 1.3164 ± 0.0087 against B=16's 1.3126 ± 0.0125
  (+0.3%, within the seed spread). It reaches B=16's mean final loss on all 3 seeds, at
  0.52-0.59x the steps and 0.97-1.11x the samples, which meets the Must show on the medians.
  The target is strict for the baseline too: B=16 itself reaches its own mean on 1 of 3
  seeds, by construction of a mean. Per seed, seed 1 needed 1.07x the wall time, so the wall
  criterion holds on the median, not on every seed.
- Wall time follows samples, not steps, on this CPU: throughput is nearly flat in B (about
  1,100-1,200 sequences/s from B=16 to 128 on 1 thread), so fewer steps save only the per-step
  overhead (8% here), while the default also pays for its estimator. On a GPU, where a larger
  batch is almost free until the device is full, the steps ratio is the one that would show.
- `gns` (B up to 64-72, square-root LR rule) reaches the target in 0.36-0.40x the steps at
  1.05-1.20x the samples; its final loss at the budget is 1.3% above B=16's. The ramp with
  the default LR rule (LR x2 from the first doubling) reaches it on 2 of 3 seeds in 0.30x
  the steps; with the LR left constant (Megatron's way) it never does (1.4029 at the
  budget): growing the batch without raising Adam's LR is an LR decay this run did not want.
- Left as it is: epoch tails give steps of 19 and 3 sequences (`examples` in the trajectory),
  carried or not as `small_tail` says; they are a handful of steps and change no ratio here.
"""


ARM_ORDER = ("default", "gns", "ramp", "ramp-constant-lr")


def _ratio(x: float | None, digits: int = 2) -> str:
    return "not reached" if x is None or math.isinf(x) else times(x, digits)


def _pilot(summary: dict[str, Any]) -> str:
    rows = [[sig(p["lr"]), p["batch_size"], f"{p['first']:.1f}", f"{p['last']:.1f}", times(p["growth"], 1),
             f"{p['final_loss']:.4f}", num(p["ready_steps"])] for p in summary.get("pilot", [])]
    if not rows:
        return "No pilot run yet."
    return table(["LR", "B", "first 5% median B_simple", "last 10% median", "growth", "final loss", "ready steps"],
                 rows, "rrrrrrr")


EPOCH_RANGES = ((0, 0.5), (0.5, 1), (1, 2), (2, 4), (4, 8), (8, 12))


def _by_epoch(data: dict[str, Any]) -> str:
    epochs, rows = data["task"]["epochs"], []
    for r in sorted((r for r in data["runs"] if r["arm"] == "pilot" and r.get("noise_trace")), key=lambda r: -r["lr"]):
        per_epoch = r["steps"] / epochs
        cells = []
        for lo, hi in EPOCH_RANGES:
            vals = [x for step, x in r["noise_trace"] if lo * per_epoch <= step < hi * per_epoch]
            cells.append(f"{statistics.median(vals):.1f}" if vals else "-")
        rows.append([sig(r["lr"]), *cells])
    header = ["pilot LR", *(f"epochs {lo:g}-{hi:g}" for lo, hi in EPOCH_RANGES)]
    return table(header, rows, "r" * len(header)) if rows else "-"


def _tuning(data: dict[str, Any]) -> str:
    by_size: dict[int, dict[float, float | None]] = {}
    for r in data["runs"]:
        if r["arm"] == "tune":
            by_size.setdefault(r["batch_size"], {})[r["lr"]] = r["final_loss"]
    chosen = {int(b): lr for b, lr in data.get("summary", {}).get("tuned_lr", {}).items()}
    rows = []
    for b, tries in sorted(by_size.items()):
        lrs = sorted(tries)
        best = chosen.get(b)
        interior = best is not None and lrs[0] < best < lrs[-1]
        cells = [f"{sig(lr)}: {'diverged' if tries[lr] is None else f'{tries[lr]:.4f}'}" for lr in lrs]
        rows.append([b, "; ".join(cells), sig(best) if best else "-", "yes" if interior else "**no**"])
    return table(["B", "LR: final loss", "chosen LR", "interior"], rows, "rlrl") if rows else "No tuning runs yet."


def _label_order(arms: dict[str, Any]) -> list[str]:
    fixed = sorted((k for k in arms if k.startswith("fixed")), key=lambda k: int(k.split("=")[1]))
    return fixed + [a for a in ARM_ORDER if a in arms]


def _results(s: dict[str, Any]) -> str:
    rows = []
    for label in _label_order(s["arms"]):
        a = s["arms"][label]
        med = a["median_ratios"] or {}
        reached = sum(p["reached"] is not None for p in a["per_seed"])
        rows.append([
            label, sig(a["lr"]), f"{a['final_loss_mean']:.4f} ± {a['final_loss_sd']:.4f}", a["seeds"],
            listing([str(b) for b in a["max_batch_size"]]), num(statistics.median(a["steps"])),
            num(statistics.median(a["samples"])), f"{statistics.median(a['wall_s']):.1f}",
            _ratio(med.get("steps")), _ratio(med.get("samples")), _ratio(med.get("wall_s")),
            f"{reached}/{a['seeds']}",
        ])
    return table(["arm", "LR", "final loss (mean ± sd)", "seeds", "max B", "steps", "samples", "wall s",
                  "steps to target", "samples to target", "wall to target", "reached"], rows, "lrrrrrrrrrrr")


def _per_seed(data: dict[str, Any], s: dict[str, Any]) -> str:
    growth = {(r["arm"], r["seed"]): r["noise_growth"] for r in data["runs"]}
    rows = []
    for label in (a for a in ARM_ORDER if a in s["arms"]):
        a = s["arms"][label]
        for p, loss, b in zip(a["per_seed"], sorted(_losses(data, label)), a["max_batch_size"], strict=True):
            r, g = p["ratios"] or {}, growth.get((label, p["seed"]))
            rows.append([label, p["seed"], f"{loss[1]:.4f}", b, _ratio(r.get("steps")), _ratio(r.get("samples")),
                         _ratio(r.get("wall_s")), times(g["growth"], 1) if g else "-"])
    return table(["arm", "seed", "final loss", "max B", "steps to target", "samples to target", "wall to target",
                  "B_simple growth"], rows, "lrrrrrrr")


def _losses(data: dict[str, Any], arm: str) -> list[tuple[int, float]]:
    return [(r["seed"], r["final_loss"]) for r in data["runs"] if r["arm"] == arm and r["seed"] in data["seeds"]]


def _verdicts(s: dict[str, Any], crit: dict[str, float]) -> tuple[list[str], bool | None]:
    lines, default_ok = [], None
    for label in ARM_ORDER:
        a = s["arms"].get(label)
        if a is None or a["must_show"] is None:
            continue
        med, ok = a["median_ratios"], a["must_show"]
        every = all(ok.values())
        if label == "default":
            default_ok = every
        name = "the default (`budget`)" if label == "default" else f"`{label}` (not the Must show's subject)"
        lines.append(
            f"- {name}: steps {_ratio(med['steps'], 3)} (<= {crit['steps_ratio']}x) {verdict(ok['steps'])}; samples "
            f"{_ratio(med['samples'], 3)} (<= {crit['samples_ratio']}x) {verdict(ok['samples'])}; wall "
            f"{_ratio(med['wall_s'], 3)} (< {crit['wall_ratio']}x) {verdict(ok['wall'])}.")
    return lines, default_ok


def render(data: Any, source: Path) -> Page:
    s, task, crit = data.get("summary", {}), data["task"], data["criteria"]
    sizes = data["sizes"]
    fields: dict[str, Any] = {
        "model": task["model"], "chars": task["max_chars"], "optimizer": task["optimizer"], "epochs": task["epochs"],
        "evals": task["evals"], "b0": sizes[0], "bmax": sizes[-1], "sizes": ", ".join(map(str, sizes)),
        "seeds": listing([str(x) for x in data["seeds"]]), "milestones": listing([str(m) for m in data["ramp_milestones"]]),
        "machine": data["machine"], "commit": data["commit"], "pilot": _pilot(s), "tuning": _tuning(data), "by_epoch": _by_epoch(data),
        "steps_ratio": crit["steps_ratio"], "samples_ratio": crit["samples_ratio"], "commentary": COMMENTARY,
        "overrun": data.get("overrun", 1.0),
    }
    if "arms" in s:
        ref = s["reference"]
        lines, default_ok = _verdicts(s, crit)
        fields.update(best=s["best_fixed"], target=f"{s['target_loss']:.4f}", ref_steps=num(ref["steps"]),
                      ref_samples=num(ref["samples"]), ref_wall=f"{ref['wall_s']:.1f}", results=_results(s), per_seed=_per_seed(data, s),
                      verdicts="\n".join(lines) or "No adaptive arm has all its seeds yet.")
    else:
        default_ok = None
        fields.update(best="(no complete fixed B yet)", target="-", ref_steps="-", ref_samples="-", ref_wall="-",
                      results="No complete fixed-B arm yet.", per_seed="-", verdicts="Not measured yet.")
    growths = [p["growth"] for p in s.get("pilot", [])]
    summary = "long charlm run (noise scale grows " + (listing([times(g, 1) for g in growths]) or "?") + "): "
    if default_ok is None:
        summary += "the default's Must show not measured yet"
    else:
        med = s["arms"]["default"]["median_ratios"]
        summary += (f"default reaches {s['best_fixed']}'s final loss in {_ratio(med['steps'])} its steps, "
                    f"{_ratio(med['samples'])} its samples, {_ratio(med['wall_s'])} its wall time: Must show "
                    f"{verdict(default_ok)}")
    return Page("Long-horizon LM: adaptive and ramped batches against a tuned fixed-B sweep", summary,
                TEMPLATE.format(**fields), written_for)
