"""Values for ``pages/equal_budget.md`` from ``equal_budget.json``: fixed B0 against the default
adaptive fit at equal epochs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, table, times, verdict


def _rows(data: Any, task: str) -> dict[float, dict[str, list[dict[str, Any]]]]:
    """The task's runs by base LR (ascending), then by method (``fixed``, ``adaptive``)."""
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


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the tasks' settings, a table per task, the Must-show verdicts."""
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
    return {
        "tasks": "\n".join(tasks_text), "tables": "\n\n".join(tables), "acc_mean": crit["acc_mean_points"],
        "loss_mean": f"{100 * crit['loss_mean_rel']:g}%", "acc_seed": crit["acc_seed_points"],
        "loss_seed": f"{crit['acc_seed_points']:g}%", "steps": crit["steps_ratio"],
        "verdicts": "\n".join(verdict_lines) or "No complete row yet.", "met": met, "total": total,
    }
