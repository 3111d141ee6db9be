"""Values for ``pages/equal_budget.md`` from ``equal_budget.json``: fixed B0 against the default
adaptive fit at equal epochs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, span, table, times, verdict


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


#: Base LR as a fraction of the tuned one -> its name in the page's values (``r.mnist1d.tuned4``).
FRACTIONS = {0.25: "tuned4", 0.5: "tuned2", 1.0: "tuned"}


def _pairs(data: Any, task: str, lr: float) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(fixed, adaptive)`` runs of one task x base LR with the same seed, by seed."""
    by_method = _rows(data, task).get(lr, {})
    adaptive = {r["seed"]: r for r in by_method.get("adaptive", [])}
    return [(f, adaptive[f["seed"]]) for f in sorted(by_method.get("fixed", []), key=lambda r: r["seed"])
            if f["seed"] in adaptive]


def _gap(f: dict[str, Any], a: dict[str, Any], higher: bool) -> float:
    """How far the adaptive run is ahead, as the reading quotes it: accuracy points above fixed
    B0, or the loss's relative change in % (negative: lower loss than fixed B0)."""
    return a["metric"] - f["metric"] if higher else -100 * (f["metric"] / a["metric"] - 1)


def _row_reading(data: Any, task: str, lr: float, higher: bool, criteria: dict[str, float]) -> dict[str, Any]:
    """What the reading cites of one task x base LR: the gaps (per seed, mean, worst in the
    verdict's sense), the steps ratios, the adaptive runs' batch, final LR and guard cuts."""
    pairs = _pairs(data, task, lr)
    v = row_verdict([f for f, _ in pairs], [a for _, a in pairs], higher, criteria)
    gaps = [_gap(f, a, higher) for f, a in pairs]
    ratios = [a["steps"] / f["steps"] for f, a in pairs]
    cuts = sum(a["guard_spikes"] > 0 for _, a in pairs)
    return {
        "lr": lr, "seeds": ", ".join(str(f["seed"]) for f, _ in pairs),
        "fixed": {str(f["seed"]): f["metric"] for f, _ in pairs},
        "fixed_metrics": listing([f"{f['metric']:.1f}" for f, _ in pairs]),
        "gap_span": span(gaps, lambda x: f"{x:.1f}"),
        "mean": v["mean_gap"] if higher else -100 * v["mean_gap"],
        "worst": v["worst_gap"] if higher else -100 * v["worst_gap"],
        "steps_span": span(ratios, lambda x: f"{x:.2f}"),
        "max_b": span([a["max_batch_size"] for _, a in pairs], str),
        "final_lr": span([a["final_lr"] for _, a in pairs], lambda x: f"{x:g}"),
        "cut_word": "never cut" if not cuts else f"cut on {cuts} of {len(pairs)} runs",
    }


def _task_reading(data: Any, task: str, meta: dict[str, Any], criteria: dict[str, float]) -> dict[str, Any]:
    """What the reading cites of one task over its base LRs: setup, steps ratios per seed and
    means per LR, the adaptive runs' batch range, the means per LR, the guard cuts."""
    higher = meta.get("higher_is_better", task == "mnist1d")
    rows = {lr: _pairs(data, task, lr) for lr in _rows(data, task)}
    runs = [(f, a) for pairs in rows.values() for f, a in pairs]
    means = [-100 * row_verdict([f for f, _ in p], [a for _, a in p], higher, criteria)["mean_gap"]
             for p in rows.values() if p]
    cuts = sum(a["guard_spikes"] > 0 for _, a in runs)
    return {
        "epochs": meta["epochs"], "b0": meta.get("initial_batch_size", 32), "tuned_lr": meta["tuned_lr"],
        "steps_span": span([a["steps"] / f["steps"] for f, a in runs], lambda x: f"{x:.2f}"),
        "steps_mean_span": span([statistics.mean(a["steps"] / f["steps"] for f, a in p) for p in rows.values() if p],
                                lambda x: f"{x:.2f}"),
        "max_b_span": span([a["max_batch_size"] for _, a in runs], str),
        "mean_span": span(means, lambda x: f"{x:.1f}") if not higher else "-",
        "cuts_word": "No guard cut" if not cuts else f"{cuts} guard cuts",
    }


def _mnist1d_upper(data: Any) -> dict[str, Any]:
    """The mnist1d runs above tuned/4: how many the guard cut, where the cut runs' batch and
    steps ended, and the runs it did not cut."""
    tuned = data["tasks"]["mnist1d"]
    runs = [(lr, f, a) for lr in _rows(data, "mnist1d") if lr > tuned["tuned_lr"] / 4
            for f, a in _pairs(data, "mnist1d", lr)]
    cut = [(lr, f, a) for lr, f, a in runs if a["guard_spikes"] > 0]
    uncut = [(lr, f, a) for lr, f, a in runs if a["guard_spikes"] == 0]
    return {
        "cut": len(cut), "runs": len(runs),
        "cut_max_b": span([a["max_batch_size"] for *_, a in cut], str),
        "cut_b_factor": span([a["max_batch_size"] // tuned["initial_batch_size"] for *_, a in cut], str),
        "cut_steps_span": span([a["steps"] / f["steps"] for _, f, a in cut], lambda x: f"{x:.2f}"),
        "uncut": listing([f"LR {lr:g}, seed {f['seed']}" for lr, f, _ in uncut]) or "none",
        "uncut_max_b": span([a["max_batch_size"] for *_, a in uncut], str) if uncut else "-",
        "uncut_steps": span([a["steps"] / f["steps"] for _, f, a in uncut], lambda x: f"{x:.2f}") if uncut else "-",
    }


def _blowup(data: Any) -> dict[str, Any]:
    """mnist1d at the tuned LR: the seed whose fixed-B0 run ended lowest, and the other seeds'
    adaptive runs against their fixed twins."""
    pairs = _pairs(data, "mnist1d", data["tasks"]["mnist1d"]["tuned_lr"])
    worst = min(pairs, key=lambda p: p[0]["metric"])
    others = [_gap(f, a, True) for f, a in pairs if f is not worst[0]]
    return {"seed": worst[0]["seed"], "fixed": worst[0]["metric"],
            "others_behind": listing([f"{-g:.2f}" for g in others]), "others_mean": statistics.mean(others)}


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
        "seeds": listing([str(x) for x in sorted({r["seed"] for r in data["runs"]})]),
        "task": {task: _task_reading(data, task, meta, crit) for task, meta in data["tasks"].items()},
        "r": {task: {FRACTIONS.get(lr / meta["tuned_lr"], f"lr{lr:g}"):
                     _row_reading(data, task, lr, meta.get("higher_is_better", task == "mnist1d"), crit)
                     for lr in _rows(data, task)} for task, meta in data["tasks"].items()},
        "upper": _mnist1d_upper(data), "blowup": _blowup(data),
    }
