"""``lr="auto"`` with Adam-family optimizers on tasks its rule was not designed on.

The Adam rule of :func:`autobatch.tune.auto_lr.choose_base_lr` (finalists: the best short
trial and its lower grid neighbour; the choice half a grid step below the last rung's
winner) was designed from one landscape: ``charlm``, AdamW, one epoch, the task of
``benchmarks/tune.py``. These tasks change what that rule relies on (the run's length,
the model's depth, the sequence length and text size, the model family), for each:

1. **grid**: 9 LRs log-spaced over the task's range, each trained with seeds 1, 2 and 3 (model
   initialisation and data order) for the full budget by a default ``fit``; *best* is the
   grid LR with the lowest mean final validation loss (highest accuracy for ``mnist1d``).
2. **lr="auto"**: for each seed, ``choose_base_lr`` (what ``fit(lr="auto")`` runs first,
   default range and fraction) on that seed's model, then the full fit at its LR; gap =
   its final metric against the fit at *best* with the same seed. Compute = study + run,
   in examples, over one run.

Compute is in training examples (evaluation passes are not counted). One torch thread.

    python -m benchmarks.auto_lr_adam                     # ~45 min on 2 shared cores
    python -m benchmarks.auto_lr_adam --tasks charlm-2ep  # one task

Writes ``benchmarks/results/auto_lr_adam.json``; ``--cache FILE`` keeps every finished fit
and study, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import autobatch
from autobatch.registry import get_problem
from autobatch.tune.auto_lr import choose_base_lr
from benchmarks._run_info import git_commit
from benchmarks.tune import Cache

OUT = Path(__file__).resolve().parent / "results" / "auto_lr_adam.json"
SEEDS = (1, 2, 3)
GRID_POINTS = 9


@dataclass(frozen=True)
class Task:
    example: str
    options: dict = field(default_factory=dict)
    epochs: float = 1.0
    lr_range: tuple[float, float] = (3e-4, 6e-3)  # the grid's, not the study's
    adamw: bool = False  # replace the example's optimizer by AdamW (its own is plain SGD)

    @property
    def metric(self) -> str:
        return "val_accuracy" if self.example == "mnist1d" else "val_loss"


TASKS = {
    "charlm-2ep": Task("charlm", {"context": 32}, 2.0),  # twice the design task's horizon
    "charlm-4ep": Task("charlm", {"context": 32}, 4.0, (2e-4, 4e-3)),
    "charlm-4layers": Task("charlm", {"context": 32, "layers": 4}, 1.0),
    "charlm-ctx16": Task("charlm", {"context": 16, "max_chars": 150_000}, 2.0),
    # 132 steps: the study has room for 3 candidates a decade apart only (a single rung)
    "charlm-ctx64": Task("charlm", {"context": 64}, 1.0),
    "mnist1d-adamw": Task("mnist1d", {}, 10.0, (3e-4, 3e-2), adamw=True),
}


def _example(task: Task, seed: int):
    ex = get_problem(task.example, seed=seed, **task.options)
    optimizer = (lambda params, lr: torch.optim.AdamW(params, lr=lr)) if task.adamw else ex.optimizer
    return ex, optimizer, round(task.epochs * len(ex.train_data[1]))


def train(task: Task, lr: float, seed: int) -> dict:
    """One default fit at ``lr`` for the task's budget; its final validation metrics."""
    ex, optimizer, total = _example(task, seed)
    model = ex.model_fn()
    start = time.perf_counter()
    try:
        result = autobatch.fit(model, ex.train_data, loss_fn=ex.loss_fn, optimizer=optimizer, lr=lr,
                               max_samples=total, initial_batch_size=ex.default_batch_size, seed=seed,
                               progress=False)
        metrics, samples = ex.evaluate(model, ex.val_data), result.samples
    except FloatingPointError:
        metrics, samples = {"val_loss": math.inf, "val_accuracy": 0.0}, total
    return {"lr": lr, "seed": seed, "samples": samples, **{k: float(v) for k, v in metrics.items()},
            "wall_time_s": round(time.perf_counter() - start, 1)}


def study(task: Task, seed: int) -> dict:
    """``choose_base_lr`` as ``fit(lr="auto")`` runs it, on the seed's model."""
    ex, optimizer, total = _example(task, seed)
    search = choose_base_lr(ex.model_fn(), ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data,
                            optimizer=optimizer, max_samples=total,
                            config={"initial_batch_size": ex.default_batch_size, "seed": seed, "progress": False})
    return {"seed": seed, "lr": search.lr, "refined": search.refined, "samples": search.samples,
            "candidates": search.candidates, "rungs": search.rungs, "survivors": search.survivors,
            "table": search.table(), "wall_time_s": round(search.wall_time_s, 1)}


def _gap(task: Task, value: float, ref: float) -> float:
    """Points of accuracy, or % of loss (positive: worse than the reference)."""
    return 100 * (ref - value) if task.metric == "val_accuracy" else 100 * (value / ref - 1)


def run_task(name: str, task: Task, cache: Cache, log) -> dict:
    lrs = [float(x) for x in np.logspace(math.log10(task.lr_range[0]), math.log10(task.lr_range[1]), GRID_POINTS)]

    def fit_at(lr: float, seed: int) -> dict:
        run = cache.get(f"{name}/fit/{lr:.6g}/{seed}", lambda: train(task, lr, seed))
        log(f"{name} lr={lr:.3g} seed={seed}: {task.metric} {run[task.metric]:.4f}")
        return run

    grid = {lr: [fit_at(lr, s) for s in SEEDS] for lr in lrs}
    mean = {lr: statistics.fmean(r[task.metric] for r in runs) for lr, runs in grid.items()}
    best = (max if task.metric == "val_accuracy" else min)(lrs, key=mean.get)
    auto = []
    for i, seed in enumerate(SEEDS):
        entry = dict(cache.get(f"{name}/auto/{seed}", lambda seed=seed: study(task, seed)))
        run, ref = fit_at(entry["lr"], seed), grid[best][i]
        entry.update(metric=run[task.metric], best_metric=ref[task.metric],
                     gap=_gap(task, run[task.metric], ref[task.metric]),
                     compute_ratio=(entry["samples"] + run["samples"]) / ref["samples"])
        log(f"{name} auto seed {seed}: lr {entry['lr']:.3g}, gap {entry['gap']:+.2f}")
        auto.append(entry)
    return {"setup": {**asdict(task), "lr_range": list(task.lr_range), "metric": task.metric,
                      "budget_examples": grid[best][0]["samples"]},
            "grid": [{"lr": lr, "mean": mean[lr], "per_seed": [r[task.metric] for r in grid[lr]]} for lr in lrs],
            "best_lr": best, "auto": auto,
            "summary": {"mean_gap": statistics.fmean(a["gap"] for a in auto),
                        "worst_gap": max(a["gap"] for a in auto),
                        "max_compute_ratio": max(a["compute_ratio"] for a in auto)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--cache", default=None, help="JSON file of finished fits and studies (resume)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Cache(args.cache)
    start = time.perf_counter()
    results = {}
    for name in args.tasks:
        results[name] = run_task(name, TASKS[name], cache, lambda msg: print(msg, flush=True))
        print(f"{name}: mean gap {results[name]['summary']['mean_gap']:+.2f}, "
              f"worst {results[name]['summary']['worst_gap']:+.2f}, "
              f"compute <= {results[name]['summary']['max_compute_ratio']:.2f} runs", flush=True)
    out = {"benchmark": "auto_lr_adam", "commit": git_commit(), "torch": torch.__version__, "seeds": list(SEEDS),
           "tasks": results, "wall_time_s": round(time.perf_counter() - start, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
