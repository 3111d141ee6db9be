"""Values for ``pages/auto_lr_adam.md`` from ``auto_lr_adam.json``: lr="auto" with Adam on tasks
its rule was not designed on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import num, sig, table, times


def _setup_rows(tasks: dict[str, Any]) -> list[list[str]]:
    """One row per task of the setup table: what it varies, its budget and LR grid."""
    rows = []
    for name, t in tasks.items():
        s = t["setup"]
        opts = ", ".join(f"{k}={v}" for k, v in s["options"].items()) or "-"
        rows.append([f"`{name}`", s["example"], opts, f"{s['epochs']:g}", num(s["budget_examples"]),
                     "AdamW" + (" (replacing SGD)" if s["adamw"] else ""), f"{sig(s['lr_range'][0], 2)}-{sig(s['lr_range'][1], 2)}",
                     sig(t["best_lr"])])
    return rows


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the setup, results and grid tables."""
    tasks = data["tasks"]
    setup = table(["task", "example", "options", "epochs", "examples per run", "optimizer", "grid range", "best LR"],
                  _setup_rows(tasks), "lllrrllr")
    rows = []
    for name, t in tasks.items():
        unit = "pt" if t["setup"]["metric"] == "val_accuracy" else "%"
        for a in t["auto"]:
            fmt = (lambda v: f"{100 * v:.1f}%") if unit == "pt" else (lambda v: f"{v:.4f}")
            rows.append([f"`{name}`", a["seed"], sig(a["lr"]), f"{len(a['candidates'])} / {len(a['rungs'])}",
                         fmt(a["metric"]), fmt(a["best_metric"]), f"{a['gap']:+.2f} {unit}",
                         times(a["compute_ratio"])])
    results = table(["task", "seed", "auto LR", "candidates / rungs", "metric", "at best LR", "gap", "compute / run"],
                    rows, "lrrrrrrr")
    summary_rows = [[f"`{n}`", f"{t['summary']['mean_gap']:+.2f}", f"{t['summary']['worst_gap']:+.2f}",
                     times(t["summary"]["max_compute_ratio"])] for n, t in tasks.items()]
    results += "\n\nMean and worst gap per task (loss %, or accuracy points for `mnist1d-adamw`):\n\n" + table(
        ["task", "mean gap", "worst seed", "compute / run (max)"], summary_rows, "lrrr")
    grids = "Grid means (final metric, mean of seeds):\n\n" + "\n\n".join(
        f"`{n}`: " + ", ".join(f"{sig(g['lr'])}: {g['mean']:.4f}" for g in t["grid"]) for n, t in tasks.items())
    return {
        "points": len(next(iter(tasks.values()))["grid"]), "seeds": ", ".join(map(str, data["seeds"])),
        "commit": data["commit"][:12], "wall": data["wall_time_s"], "setup": setup, "results": results,
        "grids": grids, "means": ", ".join(f"{n} {t['summary']['mean_gap']:+.2f}" for n, t in tasks.items()),
    }
