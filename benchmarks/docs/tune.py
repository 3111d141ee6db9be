"""Values for ``pages/tune.md`` from ``tune.json``: the base-LR choice of ``tune_lr`` and
``lr="auto"``, re-run with fresh seeds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, sig, table, times, verdict

# Targets of issue 13.
REGRET_TARGET = 1.02  # tune_lr's choice, re-run: mean final loss within 2% of the grid's choice
COMPUTE_TARGET = 0.30  # ... for at most 30% of the grid's training examples (medians over sampler seeds)
AUTO_POINTS = 0.5  # lr="auto": accuracy within 0.5 points of the fit at the best LR,
AUTO_LOSS = 0.01  # or a loss within 1%,
AUTO_COMPUTE = 1.5  # for at most 1.5x that single fit's examples (study + run)

OBJECTIVE_NAMES = {
    "tail": "`tail`: mean of the last 2 evaluations (default)",
    "final": "`final`: last evaluation",
    "best": "`best`: lowest evaluation",
    "tail4": "mean of the last 4 evaluations",
    "ema": "moving average of the weights (time constant 1/16 of the budget), last evaluation",
}


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the setup table and, per task, the tune_lr, grid, lr="auto" and
    objective tables with their verdicts."""
    tasks = data["tasks"]
    setup_rows = []
    tune_tables, tune_verdicts, grid_tables, objective_tables = [], [], [], []
    auto_rows, auto_verdicts = [], []
    summary_parts = []
    for name, res in tasks.items():
        s = res["setup"]
        setup_rows.append([
            f"`{name}`", f"{num(s['train_examples'])} / {num(s['val_examples'])}", s["optimizer"],
            s["initial_batch_size"], f"{s['epochs']:g} ({num(s['samples_per_run'])} examples)",
            f"{s['grid_points']} over [{sig(s['lr_range'][0])}, {sig(s['lr_range'][1])}]",
            f"{s['trials']} x 3 seeds",
        ])
        tune = res["tune_lr"]
        pruners = s["pruners"]
        rows = [[f"`{t['pruner']}`", t["seed"], sig(t["lr"]), _loss(t["truth"]), _ratio(t["regret"]),
                 _ratio(t["regret_vs_best_by_mean"]), f"{t['compute_ratio']:.2f}", f"{t['complete']}/{t['pruned']}"]
                for t in tune]
        rows.append(["grid", "-", sig(res["grid_choice"]), _loss(res["grid_choice_truth"]), "1.000x",
                     _ratio(res["grid_choice_truth"] / res["best_by_mean_truth"]), "1.00", f"{s['grid_points']}/0"])
        tune_tables.append(f"`{name}` (grid: {num(res['grid_samples'])} examples; best by mean "
                           f"{sig(res['best_by_mean'])}, truth {res['best_by_mean_truth']:.4f}):\n\n" + table(
            ["pruner", "sampler seed", "chosen LR", "truth", "regret", "vs best by mean", "examples / grid's",
             "trials complete/pruned"], rows, "lrrrrrrr"))
        med_r, med_c = res["summary"]["median_regret"], res["summary"]["median_compute_ratio"]
        ok = med_r is not None and med_r <= REGRET_TARGET and med_c <= COMPUTE_TARGET
        line = f"`{name}` (`{pruners[0]}`) regret {_ratio(med_r)} at {med_c:.2f} {verdict(ok)}"
        for other in pruners[1:]:
            sel = [t for t in tune if t["pruner"] == other]
            line += (f" (with `{other}`, for comparison: {_ratio(_median([t['regret'] for t in sel]))} at "
                     f"{_median([t['compute_ratio'] for t in sel]):.2f})")
        tune_verdicts.append(line)
        summary_parts.append(f"{name} tune_lr regret {_ratio(med_r)} at {med_c:.0%} "
                             f"{'met' if ok else 'MISSED'}")

        grid = res["grid"]
        shown = [g for g in grid if g["reevaluated"]]
        grid_tables.append(f"`{name}`:\n\n" + table(
            ["LR", "score (seed 0)", "final (seed 0)", "truth"],
            [[sig(g["lr"]) + ("*" if g["lr"] == res["grid_choice"] else "")
              + ("+" if g["lr"] == res["best_by_mean"] else ""),
              _loss(g["score"]), _loss(g["final"]),
              f"{_loss(g['truth'])} ± {g['truth_sem']:.3f}" if g["truth_sem"] is not None else _loss(g["truth"])]
             for g in shown], "rrrr"))

        metric = s["metric"]
        for a in res["auto"]:
            mine = (a["metrics"] or {}).get(metric)
            ref = (a["best_lr_metrics"] or {}).get(metric)
            auto_rows.append([f"`{name}`", a["seed"], sig(a["lr"]) + (" (refined)" if a["refined"] else ""),
                              _metric(mine, metric), sig(res["best_by_mean"]), _metric(ref, metric),
                              _gap(mine, ref, metric), f"{a['study_samples'] / a['run_samples']:.2f}",
                              f"{a['compute_ratio']:.2f}"])
        gap, comp = res["summary"]["auto_mean_gap"], res["summary"]["auto_max_compute_ratio"]
        if metric == "val_accuracy":
            ok = gap is not None and gap >= -AUTO_POINTS and comp <= AUTO_COMPUTE
            shown_gap = f"{gap:+.2f} points" if gap is not None else "-"
        else:
            ok = gap is not None and gap <= AUTO_LOSS and comp <= AUTO_COMPUTE
            shown_gap = f"{100 * gap:+.2f}%" if gap is not None else "-"
        auto_verdicts.append(f"`{name}` {shown_gap} at <= {comp:.2f}x {verdict(ok)}")
        summary_parts.append(f"lr=auto {shown_gap} at {comp:.2f}x {'met' if ok else 'MISSED'}")

        obj = res["objectives"]
        obj_rows = []
        for objective in dict.fromkeys(row["objective"] for row in obj.values()):
            full = obj[f"{objective}@8"]
            obj_rows.append([
                OBJECTIVE_NAMES.get(objective, objective), f"{full['mean_regret']:.3f}",
                f"{full['p_within_2pct']:.0%}",
                f"{full['cv_at_best_lrs']:.3f}" if full["cv_at_best_lrs"] is not None else "-",
                *[f"{obj[f'{objective}@{k}']['mean_regret']:.3f} / {obj[f'{objective}@{k}']['p_best_in_top_third']:.0%}"
                  for k in (1, 2, 4)],
            ])
        objective_tables.append(f"`{name}` ({len(shown)} LRs):\n\n" + table(
            ["score", "regret (8 evals)", "regret <= 2%", "spread", "after 1 eval: regret / top third",
             "after 2", "after 4"], obj_rows, "lrrrrrr"))

    setup_table = table(["task", "train / val", "optimizer", "B0", "budget (epochs)", "grid", "tune_lr trials"],
                        setup_rows, "lllrlll")
    auto_table = table(["task", "seed", "auto LR", "metric", "best LR", "its metric", "gap", "study / run",
                        "compute / run"], auto_rows, "lrrrrrrrr")
    first = next(iter(tasks.values()))
    machine = data["machine"]
    return {
        "setup_table": setup_table, "threads": machine["threads"],
        "seeds": listing([str(x) for x in first["setup"]["fresh_seeds"]]),
        "minutes": data["work_wall_time_s"] / 60, "cpus": machine["cpus"],
        "tune_tables": "\n\n".join(tune_tables), "regret_target": REGRET_TARGET, "compute_target": COMPUTE_TARGET,
        "tune_verdicts": listing(tune_verdicts), "grid_tables": "\n\n".join(grid_tables), "auto_table": auto_table,
        "auto_points": AUTO_POINTS, "auto_loss": AUTO_LOSS, "auto_compute": AUTO_COMPUTE,
        "auto_verdicts": listing(auto_verdicts), "draws": f"{2000:,}",
        "objective_tables": "\n\n".join(objective_tables), "summary": "; ".join(summary_parts),
    }


def _median(xs: list[float | None]) -> float | None:
    """The median, with ``None`` counted as infinite."""
    vals = sorted(math.inf if v is None else v for v in xs)
    return vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2


def _loss(x: float | None) -> str:
    """A loss to 4 decimals, ``-`` for none."""
    return "-" if x is None else f"{x:.4f}"


def _ratio(x: float | None) -> str:
    """A ratio to 3 decimals (``1.012x``), ``-`` for none."""
    return "-" if x is None else times(x, 3)


def _metric(x: float | None, metric: str) -> str:
    """A final metric: accuracy in %, loss to 4 decimals, ``-`` for none."""
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if metric == "val_accuracy" else f"{x:.4f}"


def _gap(mine: float | None, ref: float | None, metric: str) -> str:
    """``mine`` against ``ref``: accuracy points or relative loss, ``-`` if either is missing."""
    if mine is None or ref is None:
        return "-"
    return f"{100 * (mine - ref):+.1f} pt" if metric == "val_accuracy" else f"{100 * (mine / ref - 1):+.2f}%"

