"""``autobatch.tune_lr`` against a dense log-spaced LR grid, on MNIST-1D.

Both searches train the built-in MNIST-1D CNN (4,000 train / 1,000 validation examples,
plain SGD, base batch B0 = 16, the default adaptive ``gns`` policy with its default LR
scaling) for the same budget per run (``--epochs``, 10 by default), with 8 validation
evaluations per run at equal sample counts:

- ``grid``: every point of a log-spaced grid over ``--lr-range`` (20 points, x1.52 apart),
  each trained with the full budget. It runs through ``autobatch.search`` with Optuna's
  GridSampler and no pruning, so a point is trained and scored exactly as a trial would be;
  a point that diverges stops there (and is charged only what it trained).
- ``tune_lr``: ``--trials`` trials over the same range (TPE, the default MedianPruner), for
  ``--seeds`` sampler seeds, once per objective: ``final`` (the validation loss at the end
  of the budget, the default) and ``best`` (the lowest of the 8 evaluations). One grid run
  gives both of the grid's scores.

Every run uses the same model initialisation and data order, so the comparison isolates the
search. Compute is counted in training examples processed (pruned trials count up to where
they stopped); the validation passes (forward only) are not counted.

Target (issue 5): best validation loss within 2% of the grid's best, for at most 30% of the
grid's training examples.

Run: ``python benchmarks/tune.py`` (about 7 minutes on 2 shared CPU cores, one thread;
writes benchmarks/results/tune.json). ``--quick`` runs a small smoke version.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import optuna
import torch

import autobatch
from autobatch.problems import get_example

OBJECTIVES = ("final", "best")


def study_kwargs(ex, args, config: dict) -> dict:
    return dict(loss_fn=ex.loss_fn, val_data=ex.val_data, budget=args.epochs, optimizer=ex.optimizer,
                config=config, storage=optuna.storages.InMemoryStorage())


def lr_space(low: float, high: float):
    return lambda trial: {"lr": trial.suggest_float("lr", low, high, log=True)}


def working_tree() -> dict:
    """The commit and whether autobatch/ had uncommitted edits (others work in this checkout)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=30,
                                  cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--", "autobatch").splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=10.0, help="budget of every run, in epochs")
    parser.add_argument("--grid", type=int, default=20, help="grid points")
    parser.add_argument("--trials", type=int, default=12, help="tune_lr trials per seed and objective")
    parser.add_argument("--seeds", type=int, default=3, help="tune_lr repeats (sampler seeds)")
    parser.add_argument("--lr-range", type=float, nargs=2, default=(1e-3, 3.0))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not the reported figures)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tune.json"))
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.grid, args.trials, args.seeds = 1.0, 6, 4, 1
    torch.set_num_threads(1)

    ex = get_example("mnist1d", seed=0)
    n = len(ex.train_data[1])
    samples = round(args.epochs * n)
    config = {"initial_batch_size": ex.default_batch_size, "seed": 0, "progress": False}
    low, high = args.lr_range
    started = time.perf_counter()

    # The grid runs through the same machinery as the trials (a GridSampler, no pruning), so a
    # point is trained and scored exactly as a trial at that LR would be.
    lrs = [float(x) for x in np.logspace(math.log10(low), math.log10(high), args.grid)]
    t0 = time.perf_counter()
    grid_study = autobatch.search(
        ex.model_fn, ex.train_data, space=lr_space(low, high), n_trials=args.grid, pruner="none",
        sampler=optuna.samplers.GridSampler({"lr": lrs}), study_name="grid", **study_kwargs(ex, args, config))
    grid_wall = time.perf_counter() - t0
    grid = []
    for trial in sorted(grid_study.study.trials, key=lambda t: t.params["lr"]):
        values = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
        finite = [v for v in values if math.isfinite(v)]
        done = trial.state.name == "COMPLETE"
        grid.append({"lr": trial.params["lr"], "final": trial.value if done else None,
                     "best": min(finite) if done and finite else None,
                     "samples": trial.user_attrs["samples"], "reason": trial.user_attrs.get("reason")})
    grid_samples = sum(g["samples"] for g in grid)
    grid_best = {obj: min((g for g in grid if g[obj] is not None), key=lambda g: g[obj]) for obj in OBJECTIVES}
    print(f"grid: {args.grid} points x {args.epochs:g} epochs ({samples} examples each), "
          f"lr in [{low:g}, {high:g}], x{(high / low) ** (1 / (args.grid - 1)):.2f} steps, {grid_wall:.0f} s")
    print(f"{'lr':>9} {'final':>7} {'best':>7}")
    for g in grid:
        print(f"{g['lr']:9.4g} {_f(g['final']):>7} {_f(g['best']):>7}  {g['reason'] or ''}")

    tuned = []
    for objective in OBJECTIVES:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            result = autobatch.tune_lr(
                ex.model_fn, ex.train_data, n_trials=args.trials, lr_range=(low, high), seed=seed,
                objective=objective, study_name=f"tune-{objective}-{seed}", **study_kwargs(ex, args, config))
            states = [row.state for row in result.trials]
            ref = grid_best[objective]
            tuned.append({
                "objective": objective, "seed": seed, "best_lr": result.best_lr,
                "best_val_loss": result.best_value, "samples": result.total_samples,
                "wall_time_s": time.perf_counter() - t0,
                "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                "diverged": sum(bool(r.reason and r.reason.startswith("diverged")) for r in result.trials),
                "loss_ratio": result.best_value / ref[objective] if result.best_value is not None else None,
                "compute_ratio": result.total_samples / grid_samples,
                "trials": [row.model_dump() for row in result.trials],
            })

    print(f"\n{'objective':<9} {'search':<10} {'best lr':>8} {'val_loss':>9} {'vs grid':>8} {'samples':>9} "
          f"{'vs grid':>8} {'done/pruned':>12} {'wall s':>7}")
    summary = {}
    for objective in OBJECTIVES:
        ref = grid_best[objective]
        print(f"{objective:<9} {'grid':<10} {ref['lr']:8.4g} {ref[objective]:9.4f} {1:8.3f} {grid_samples:9d} "
              f"{1:8.3f} {args.grid:>12} {grid_wall:7.1f}")
        runs = [t for t in tuned if t["objective"] == objective]
        for t in runs:
            print(f"{objective:<9} {'seed ' + str(t['seed']):<10} {t['best_lr']:8.4g} {t['best_val_loss']:9.4f} "
                  f"{t['loss_ratio']:8.3f} {t['samples']:9d} {t['compute_ratio']:8.3f} "
                  f"{str(t['complete']) + '/' + str(t['pruned']):>12} {t['wall_time_s']:7.1f}")
        loss_ratios = [t["loss_ratio"] for t in runs]
        compute_ratios = [t["compute_ratio"] for t in runs]
        summary[objective] = {
            "median_loss_ratio": statistics.median(loss_ratios), "worst_loss_ratio": max(loss_ratios),
            "median_compute_ratio": statistics.median(compute_ratios),
            "worst_compute_ratio": max(compute_ratios),
            "seeds_meeting_target": sum(a <= 1.02 and b <= 0.30 for a, b in zip(loss_ratios, compute_ratios)),
        }
        print(f"  target loss ratio <= 1.02 at compute ratio <= 0.30: median {summary[objective]['median_loss_ratio']:.3f}"
              f" at {summary[objective]['median_compute_ratio']:.3f}; seeds meeting both: "
              f"{summary[objective]['seeds_meeting_target']}/{len(runs)}")
    print(f"total {time.perf_counter() - started:.0f} s")

    out = {
        "benchmark": "tune", "quick": args.quick,
        "setup": {"example": "mnist1d", "train_examples": n, "val_examples": len(ex.val_data[1]),
                  "epochs_per_run": args.epochs, "samples_per_run": samples, "grid_points": args.grid,
                  "lr_range": [low, high], "trials_per_seed": args.trials, "seeds": args.seeds,
                  "initial_batch_size": ex.default_batch_size, "policy": "gns (default)",
                  "pruner": "median (default)", "n_evals": 8, "threads": torch.get_num_threads()},
        "grid": grid, "grid_best": grid_best, "grid_samples": grid_samples, "grid_wall_time_s": grid_wall,
        "tune_lr": tuned, "summary": summary,
        "working_tree": working_tree(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "optuna": optuna.__version__},
        "total_wall_time_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
