"""Page for ``long_lm.json``: a long language-model run, adaptive and ramped batches against a
tuned fixed-B sweep, to the best fixed B's final loss."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, listing, num, sig, table, times, verdict

written_for = "unset"  # the commentary was checked against these results

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
- Machine: {machine}. Wall times are indicative only. Commit `{commit}`.

```bash
python -m benchmarks.long_lm                 # all phases, resumable
python -m benchmarks.long_lm --phase pilot   # the noise-scale check alone
```

## Noise-scale growth

{pilot}

## LR tuning (seed 0, final loss)

{tuning}

## Results

Target: {best}'s mean final loss {target}; its median run: {ref_steps} steps,
{ref_samples} samples, {ref_wall} s.

{results}

Final loss, max B, steps, samples and wall time are at the budget (medians over seeds). The
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

Commentary to be written against the final figures.
"""

ARM_ORDER = ("default", "gns", "ramp", "ramp-constant-lr")


def _ratio(x: float | None) -> str:
    return "not reached" if x is None or math.isinf(x) else times(x)


def _pilot(summary: dict[str, Any]) -> str:
    rows = [[sig(p["lr"]), p["batch_size"], f"{p['first']:.1f}", f"{p['last']:.1f}", times(p["growth"], 1),
             f"{p['final_loss']:.4f}", num(p["ready_steps"])] for p in summary.get("pilot", [])]
    if not rows:
        return "No pilot run yet."
    return table(["LR", "B", "first 5% median B_simple", "last 10% median", "growth", "final loss", "ready steps"],
                 rows, "rrrrrrr")


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
            f"- {name}: steps {_ratio(med['steps'])} (<= {crit['steps_ratio']}x) {verdict(ok['steps'])}; samples "
            f"{_ratio(med['samples'])} (<= {crit['samples_ratio']}x) {verdict(ok['samples'])}; wall "
            f"{_ratio(med['wall_s'])} (< {crit['wall_ratio']}x) {verdict(ok['wall'])}.")
    return lines, default_ok


def render(data: Any, source: Path) -> Page:
    s, task, crit = data.get("summary", {}), data["task"], data["criteria"]
    sizes = data["sizes"]
    fields: dict[str, Any] = {
        "model": task["model"], "chars": task["max_chars"], "optimizer": task["optimizer"], "epochs": task["epochs"],
        "evals": task["evals"], "b0": sizes[0], "bmax": sizes[-1], "sizes": ", ".join(map(str, sizes)),
        "seeds": listing([str(x) for x in data["seeds"]]), "milestones": listing([str(m) for m in data["ramp_milestones"]]),
        "machine": data["machine"], "commit": data["commit"], "pilot": _pilot(s), "tuning": _tuning(data),
        "steps_ratio": crit["steps_ratio"], "samples_ratio": crit["samples_ratio"], "commentary": COMMENTARY,
        "overrun": data.get("overrun", 1.0),
    }
    if "arms" in s:
        ref = s["reference"]
        lines, default_ok = _verdicts(s, crit)
        fields.update(best=s["best_fixed"], target=f"{s['target_loss']:.4f}", ref_steps=num(ref["steps"]),
                      ref_samples=num(ref["samples"]), ref_wall=f"{ref['wall_s']:.1f}", results=_results(s),
                      verdicts="\n".join(lines) or "No adaptive arm has all its seeds yet.")
    else:
        default_ok = None
        fields.update(best="(no complete fixed B yet)", target="-", ref_steps="-", ref_samples="-", ref_wall="-",
                      results="No complete fixed-B arm yet.", verdicts="Not measured yet.")
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
