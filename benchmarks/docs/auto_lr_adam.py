"""Values for ``pages/auto_lr_adam.md`` from ``auto_lr_adam.json``: lr="auto" with Adam on tasks
its rule was not designed on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, sci, sig, span, table, times

#: A loss task "holds" where the mean gap is within this many percent (lr="auto"'s loss target
#: on the tune page).
HOLDS_PCT = 1.0
#: A trial the study completed, in its table: ``6*  complete  0.005179   2.634 ...`` (``*``: ranked first).
COMPLETE_TRIAL = re.compile(r"^\d+(\*?)\s+complete\s+(\S+)\s+(\S+)", re.MULTILINE)
NUMBER_WORDS = {1: "one rung", 2: "two rungs", 3: "three rungs"}


def _seed_values(task: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    """One seed's study: its LR and gap, the finalists it compared last (``winner``: ranked
    first), and how far the winner sits above the grid's best LR (``bias``)."""
    finalists = [(float(lr), star == "*") for star, lr, _ in COMPLETE_TRIAL.findall(a["table"])]
    winner = next((lr for lr, star in finalists if star), None)
    loser = next((lr for lr, star in finalists if not star), None)
    return {"lr": a["lr"], "gap": a["gap"], "drop": -a["gap"], "winner": winner or "-", "loser": loser or "-",
            "bias": winner / task["best_lr"] if winner else "-"}


def _task_values(t: dict[str, Any]) -> dict[str, Any]:
    """What the reading cites of one task: its summary gaps, best LR, the studies' candidates
    and rungs, the share of the run the last rung saw, and each seed's study."""
    s, first = t["setup"], t["auto"][0]
    gaps = [a["gap"] for a in t["auto"]]
    cands = first["candidates"]
    return {
        "mean_gap": t["summary"]["mean_gap"], "worst_gap": t["summary"]["worst_gap"], "best_lr": t["best_lr"],
        "candidates": len(cands), "candidate_lrs": ", ".join(sci(x) for x in cands),
        "rungs_word": NUMBER_WORDS.get(len(first["rungs"]), f"{len(first['rungs'])} rungs"),
        "study_share": f"1/{round(s['budget_examples'] / first['rungs'][-1])}",
        "half_step": (cands[1] / cands[0]) ** 0.5, "lrs": listing(sorted({sci(a["lr"]) for a in t["auto"]})),
        "gap_span": f"{min(gaps):+.0f} to {max(gaps):+.0f}",
        "seeds": {str(a["seed"]): _seed_values(t, a) for a in t["auto"]},
    }


def _setup_rows(tasks: dict[str, Any]) -> list[list[str]]:
    """One row per task of the setup table: what it varies, its budget and LR grid."""
    rows = []
    for name, t in tasks.items():
        s = t["setup"]
        opts = ", ".join(f"{k}={v}" for k, v in s["options"].items()) or "-"
        rows.append(
            [
                f"`{name}`",
                s["example"],
                opts,
                f"{s['epochs']:g}",
                num(s["budget_examples"]),
                "AdamW" + (" (replacing SGD)" if s["adamw"] else ""),
                f"{sig(s['lr_range'][0], 2)}-{sig(s['lr_range'][1], 2)}",
                sig(t["best_lr"]),
            ]
        )
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
        "tasks": {n: _task_values(t) for n, t in tasks.items()},
        "holds_candidates": span([len(t["auto"][0]["candidates"]) for t in tasks.values()
                                  if t["setup"]["metric"] != "val_accuracy" and t["summary"]["mean_gap"] <= HOLDS_PCT], str),
        "grids": grids, "means": ", ".join(f"{n} {t['summary']['mean_gap']:+.2f}" for n, t in tasks.items()),
    }
