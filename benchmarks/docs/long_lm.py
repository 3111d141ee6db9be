"""Values for ``pages/long_lm.md`` from ``long_lm.json``: a long language-model run, adaptive and
ramped batches against a tuned fixed-B sweep, to the best fixed B's final loss."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, sci, sig, span, table, times, verdict
from benchmarks.docs._template import PENDING

ARM_ORDER = ("default", "gns", "ramp", "ramp-constant-lr")


def _ratio(x: float | None, digits: int = 2) -> str:
    """A ratio to the target (``0.53x``), or ``not reached``."""
    return "not reached" if x is None or math.isinf(x) else times(x, digits)


def _pilot(summary: dict[str, Any]) -> str:
    """The pilot runs' noise-scale growth table."""
    rows = [[sig(p["lr"]), p["batch_size"], f"{p['first']:.1f}", f"{p['last']:.1f}", times(p["growth"], 1),
             f"{p['final_loss']:.4f}", num(p["ready_steps"])] for p in summary.get("pilot", [])]
    if not rows:
        return "No pilot run yet."
    return table(["LR", "B", "first 5% median B_simple", "last 10% median", "growth", "final loss", "ready steps"],
                 rows, "rrrrrrr")


EPOCH_RANGES = ((0, 0.5), (0.5, 1), (1, 2), (2, 4), (4, 8), (8, 12))


def _epoch_medians(data: dict[str, Any]) -> list[tuple[float, list[float | None]]]:
    """Per pilot run (highest LR first): its LR and the median ``B_simple`` in each of
    :data:`EPOCH_RANGES` (``None`` where the trace has no point)."""
    epochs, out = data["task"]["epochs"], []
    for r in sorted((r for r in data["runs"] if r["arm"] == "pilot" and r.get("noise_trace")), key=lambda r: -r["lr"]):
        per_epoch = r["steps"] / epochs
        cells = []
        for lo, hi in EPOCH_RANGES:
            vals = [x for step, x in r["noise_trace"] if lo * per_epoch <= step < hi * per_epoch]
            cells.append(statistics.median(vals) if vals else None)
        out.append((r["lr"], cells))
    return out


def _by_epoch(data: dict[str, Any]) -> str:
    """The pilot runs' median ``B_simple`` by range of epochs."""
    rows = [[sig(lr), *("-" if x is None else f"{x:.1f}" for x in cells)] for lr, cells in _epoch_medians(data)]
    header = ["pilot LR", *(f"epochs {lo:g}-{hi:g}" for lo, hi in EPOCH_RANGES)]
    return table(header, rows, "r" * len(header)) if rows else "-"


def _tens(values: list[float]) -> str:
    """The values' span, each rounded to tens (``40-70``): for figures the reading gives roughly."""
    return span(values, lambda x: f"{round(x, -1):.0f}") if values else "-"


def _growth(data: dict[str, Any]) -> dict[str, Any]:
    """Where the pilots' noise scale grew: the median by the end of the first epoch and over the
    later epochs, rounded to tens, and how many epochs those are."""
    medians = _epoch_medians(data)
    first = [cells[i] for _, cells in medians for i, (_, hi) in enumerate(EPOCH_RANGES) if hi == 1]
    later = [cells[i] for _, cells in medians for i, (lo, _) in enumerate(EPOCH_RANGES) if lo >= 1]
    return {"first_epoch": _tens([x for x in first if x is not None]),
            "later": _tens([x for x in later if x is not None]), "later_epochs": data["task"]["epochs"] - 1}


def _reached(n: int, of: int) -> str:
    """``all 3 seeds`` / ``2 of 3 seeds`` / ``no seed``."""
    return "no seed" if n == 0 else f"all {of} seeds" if n == of else f"{n} of {of} seeds"


def _arm_reading(data: dict[str, Any], s: dict[str, Any], label: str) -> dict[str, Any]:
    """What the reading cites of one arm: final loss (mean, sd, against the target), the seeds
    that reached the target and their ratios, where B went and when, the in-run noise growth."""
    a = s["arms"][label]
    reached = [p for p in a["per_seed"] if p["reached"] is not None]
    runs = [r for r in data["runs"] if r["arm"] == label and r["seed"] in data["seeds"]]
    top = [next((step for step, b, _ in r["trajectory"] if b == r["max_batch_size"]), None) for r in runs]
    growth = [r["noise_growth"]["growth"] for r in runs if r.get("noise_growth")]
    slow = [p for p in reached if p["ratios"]["wall_s"] > 1]
    return {
        "mean": a["final_loss_mean"], "sd": a["final_loss_sd"], "vs_best": a["final_loss_mean"] / s["target_loss"] - 1,
        "reached": _reached(len(reached), a["seeds"]),
        "steps_span": span([p["ratios"]["steps"] for p in reached], lambda x: f"{x:.2f}") if reached else "-",
        "samples_span": span([p["ratios"]["samples"] for p in reached], lambda x: f"{x:.2f}") if reached else "-",
        "max_b": span(a["max_batch_size"], str),
        "grow_steps": _tens([x for x in top if x is not None]),
        "in_run_growth": span(growth, lambda x: f"{x:.0f}") if growth else "-",
        "slow_wall": listing([f"seed {p['seed']} needed {p['ratios']['wall_s']:.2f}x" for p in slow]) or "no seed needed more",
    }


def _tuned_lrs(s: dict[str, Any]) -> str:
    """``1.5e-3 at 16, 32 and 128, 2e-3 at 64``: each tuned LR and the sizes it was tuned for."""
    by_lr: dict[float, list[int]] = {}
    for b, lr in sorted(s.get("tuned_lr", {}).items(), key=lambda kv: int(kv[0])):
        by_lr.setdefault(lr, []).append(int(b))
    return ", ".join(f"{sci(lr)} at {listing([str(b) for b in sizes])}" for lr, sizes in by_lr.items()) or "-"


def _throughput(s: dict[str, Any]) -> str:
    """The fixed arms' sequences per second (samples over median wall time), rounded to hundreds."""
    rates = [statistics.median(a["samples"]) / statistics.median(a["wall_s"])
             for label, a in s["arms"].items() if label.startswith("fixed")]
    return span(rates, lambda x: f"{round(x, -2):,.0f}") if rates else "-"


def _tuning(data: dict[str, Any]) -> str:
    """The LR tuning table: every LR tried per fixed B, the one chosen, whether it is interior."""
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
    """The arms in table order: fixed sizes ascending, then :data:`ARM_ORDER`."""
    fixed = sorted((k for k in arms if k.startswith("fixed")), key=lambda k: int(k.split("=")[1]))
    return fixed + [a for a in ARM_ORDER if a in arms]


def _results(s: dict[str, Any]) -> str:
    """The main results table: one row per arm, medians over seeds."""
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
    """One row per seed of the arms that start at B0."""
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
    """``(seed, final loss)`` of the arm's runs on the benchmark's seeds."""
    return [(r["seed"], r["final_loss"]) for r in data["runs"] if r["arm"] == arm and r["seed"] in data["seeds"]]


def _verdicts(s: dict[str, Any], crit: dict[str, float]) -> tuple[list[str], bool | None]:
    """One Must-show line per non-fixed arm, and whether the default met all three checks."""
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


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the pilot, tuning, results and per-seed
    tables, the Must-show verdicts (placeholders while the run is incomplete)."""
    s, task, crit = data.get("summary", {}), data["task"], data["criteria"]
    sizes = data["sizes"]
    fields: dict[str, Any] = {
        "model": task["model"],
        "chars": task["max_chars"],
        "optimizer": task["optimizer"],
        "epochs": task["epochs"],
        "evals": task["evals"],
        "b0": sizes[0],
        "bmax": sizes[-1],
        "sizes": ", ".join(map(str, sizes)),
        "seeds": listing([str(x) for x in data["seeds"]]),
        "milestones": listing([str(m) for m in data["ramp_milestones"]]),
        "machine": data["machine"],
        "commit": data["commit"],
        "pilot": _pilot(s),
        "tuning": _tuning(data),
        "by_epoch": _by_epoch(data),
        "steps_ratio": crit["steps_ratio"],
        "samples_ratio": crit["samples_ratio"],
        "overrun": data.get("overrun", 1.0),
    }
    seeds_of = {arm: sorted({r["seed"] for r in data["runs"] if r["arm"] == arm}) for arm in ("pilot", "tune")}
    fields.update(
        n_runs=len(data["runs"]),
        n_seeds=len(data["seeds"]),
        total_min=round(sum(r.get("total_s", r["wall_s"]) for r in data["runs"]) / 60, -1),
        pilot_seed=listing([str(x) for x in seeds_of["pilot"]]) or "-",
        tune_seed=listing([str(x) for x in seeds_of["tune"]]) or "-",
        pilots=[{"lr": p["lr"], "growth": p["growth"]} for p in s.get("pilot", [])] or PENDING,
        growth=_growth(data),
        tuned_lrs=_tuned_lrs(s),
    )
    if "arms" in s:
        ref = s["reference"]
        fixed = [s["arms"][label] for label in _label_order(s["arms"]) if label.startswith("fixed")]
        fields.update(
            arm={label: _arm_reading(data, s, label) for label in ARM_ORDER if label in s["arms"]},
            best_b=int(s["best_fixed"].split("=")[1]), best_arm=_arm_reading(data, s, s["best_fixed"]),
            fixed_small={"mean": fixed[0]["final_loss_mean"]}, fixed_large={"mean": fixed[-1]["final_loss_mean"]},
            throughput=_throughput(s),
        )
        lines, default_ok = _verdicts(s, crit)
        fields.update(
            best=s["best_fixed"],
            target=f"{s['target_loss']:.4f}",
            ref_steps=num(ref["steps"]),
            ref_samples=num(ref["samples"]),
            ref_wall=f"{ref['wall_s']:.1f}",
            results=_results(s),
            per_seed=_per_seed(data, s),
            verdicts="\n".join(lines) or "No adaptive arm has all its seeds yet.",
        )
    else:
        default_ok = None
        fields.update(arm=PENDING, best_b="-", best_arm=PENDING, fixed_small=PENDING, fixed_large=PENDING, throughput="-")
        fields.update(best="(no complete fixed B yet)", target="-", ref_steps="-", ref_samples="-", ref_wall="-",
                      results="No complete fixed-B arm yet.", per_seed="-", verdicts="Not measured yet.")
    growths = [p["growth"] for p in s.get("pilot", [])]
    fields["growths"] = listing([times(g, 1) for g in growths]) or "?"
    if default_ok is None:
        fields["summary_verdict"] = "the default's Must show not measured yet"
    else:
        med = s["arms"]["default"]["median_ratios"]
        fields["summary_verdict"] = (
            f"default reaches {s['best_fixed']}'s final loss in {_ratio(med['steps'])} its steps, "
            f"{_ratio(med['samples'])} its samples, {_ratio(med['wall_s'])} its wall time: Must show "
            f"{verdict(default_ok)}")
    return fields
