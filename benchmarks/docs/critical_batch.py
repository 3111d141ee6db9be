"""Values for ``pages/critical_batch.md`` from ``critical_batch.json``: the critical batch measured
by branched training at three points of each task, next to the raw and Adam-preconditioned
noise scales."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, sci, table, times

GEOMETRIES = {"raw": "raw B_simple", "adam": "Adam's B_simple"}


def _inside(point: dict[str, Any]) -> bool:
    """The fitted B_crit is at most twice the largest B measured, where E(B) has grown by half
    of E_min or more: past that the fit extrapolates a slope the grid barely shows."""
    b = point["fit"]["b_crit"]
    return b is not None and b <= 2 * point["max_batch"]


def _b_crit(point: dict[str, Any]) -> str:
    fit = point["fit"]
    if fit["b_crit"] is not None and not _inside(point):
        return f"> {2 * point['max_batch']} (fit: {num(fit['b_crit'])})"
    if fit["b_crit"] is not None:
        return num(fit["b_crit"])
    if fit["bound"] == "above":
        return f"> {point['max_batch']} (flat)"
    return f"< {point['b0'] * 2} (no fit)"


def _shown_ratio(p: dict[str, Any], g: str) -> str:
    """A noise scale over B_crit as the table shows it: a bound when B_crit is past the grid."""
    ratio, scale = p["ratios"].get(g), p["noise"][g]["noise_scale"]
    if ratio is not None and not _inside(p):
        return f"< {times(scale / (2 * p['max_batch']))}"
    return "-" if ratio is None else times(ratio)


def _task_table(entry: dict[str, Any]) -> str:
    batches = [r["batch"] for r in entry["points"][0]["per_batch"]]
    geometries = [g for g in GEOMETRIES if g in entry["points"][0]["noise"]]
    rows = []
    for p in entry["points"]:
        e = [num(r["examples"]) if r["examples"] is not None else "not reached" for r in p["per_batch"]]
        cells = [f"{p['fraction']:.0%}", f"{p['start_loss']:.3f}", f"{p['target_loss']:.3f}", *e, _b_crit(p),
                 num(p["tolerance_b_crit"])]
        for g in geometries:
            cells += [num(p["noise"][g]["noise_scale"]), _shown_ratio(p, g)]
        rows.append(cells)
    header = ["point", "start loss", "target", *[f"E(B={b})" for b in batches], "B_crit (fit)", "tolerance rule"]
    for g in geometries:
        header += [GEOMETRIES[g], "/ B_crit"]
    return table(header, rows, "l" + "r" * (len(header) - 1))


def _edges(entry: dict[str, Any]) -> tuple[float, float]:
    """The LR grid's lowest and highest multiples: a best LR there may lie past the grid."""
    return min(entry["lr_grid"]), max(entry["lr_grid"])


def _lrs(entry: dict[str, Any]) -> str:
    """Each B's best LR per point, ``*`` where it is at an edge of the grid (the best may lie past it)."""
    edges = _edges(entry)
    rows = []
    for p in entry["points"]:
        rows.append([f"{p['fraction']:.0%}", *[
            "-" if r["lr_mult"] is None else f"{sci(r['lr'])} (x{r['lr_mult']:g}){'*' if r['lr_mult'] in edges else ''}"
            for r in p["per_batch"]]])
    return table(["point", *[f"B={r['batch']}" for r in entry["points"][0]["per_batch"]]], rows,
                 "l" + "r" * len(entry["points"][0]["per_batch"]))


def _geo_mean(xs: list[float]) -> float | None:
    return statistics.geometric_mean(xs) if xs else None


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g in GEOMETRIES:
        ratios = [p["ratios"][g] for p in entry["points"] if p["ratios"].get(g) is not None and _inside(p)]
        gm = _geo_mean(ratios)
        out[g] = "-" if gm is None else times(gm)
        # the typical factor between the two, whichever side: exp(mean |log ratio|)
        off = _geo_mean([max(r, 1 / r) for r in ratios])
        out[f"{g}_off"] = "-" if off is None else times(off)
        out[f"{g}_span"] = ("-" if g not in entry["points"][0]["noise"] else
                            listing([_shown_ratio(p, g) for p in entry["points"]]))
    out["fitted"] = sum(_inside(p) for p in entry["points"])
    edges = _edges(entry)
    chosen = [r["lr_mult"] for p in entry["points"] for r in p["per_batch"] if r["lr_mult"] is not None]
    out["at_edge"] = f"{sum(m in edges for m in chosen)} of {len(chosen)}"
    out["points"] = len(entry["points"])
    out["b_crit"] = listing([_b_crit(p) for p in entry["points"]])
    out["raw_scales"] = listing([num(p["noise"]["raw"]["noise_scale"]) for p in entry["points"]])
    return out


def _costs(tasks: dict[str, dict[str, Any]]) -> str:
    """Where each noise scale puts B on the fitted frontier: E/E_min = 1 + B/B_crit and
    S/S_min = 1 + B_crit/B at B = the noise scale (points with B_crit inside the grid)."""
    rows = []
    for name, e in tasks.items():
        for p in e["points"]:
            if not _inside(p):
                continue
            for g in GEOMETRIES:
                if g in p["noise"]:
                    r = p["noise"][g]["noise_scale"] / p["fit"]["b_crit"]
                    rows.append([name, f"{p['fraction']:.0%}", GEOMETRIES[g], num(p["noise"][g]["noise_scale"]),
                                 num(p["fit"]["b_crit"]), times(1 + r), times(1 + 1 / r)])
    return table(["task", "point", "B set to", "B", "B_crit", "examples / E_min", "steps / S_min"], rows,
                 "lllrrrr")


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: per task its protocol, its table and LR choices, and the ratios."""
    tasks = {e["task"]: e for e in data["tasks"]}
    out: dict[str, Any] = {"commit": data["commit"][:7],
                           "minutes": f"{sum(e['wall_s'] for e in data['tasks']) / 60:.0f}"}
    protocol = []
    for name, e in tasks.items():
        key = name.replace("-", "_")
        protocol.append([name, e["optimizer"], e["b0"], sci(e["lr0"]) + ("" if e["adamw_lr"] is None else
                                                                         f" (AdamW part {sci(e['adamw_lr'])})"),
                         e["rule"], listing([f"x{m:g}" for m in e["lr_grid"]]), num(e["budget"]), num(e["window"]),
                         len(e["seeds"]), num(e["train_examples"]), f"{e['wall_s'] / 60:.0f}"])
        out[key] = {"table": _task_table(e), "lrs": _lrs(e), "plot": f"../../benchmarks/results/critical_batch_{name}.png",
                    **_summary(e)}
    out["costs"] = _costs(tasks)
    out["protocol"] = table(["task", "optimizer", "B0", "LR at B0", "rule", "LR grid (x rule)", "budget (examples)",
                             "window (examples)", "seeds", "train set", "minutes"], protocol, "llrllrrrrrr")
    return out
