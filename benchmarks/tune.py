"""The base-LR choice, scored by re-running it: ``tune_lr`` and ``lr="auto"`` against a grid.

A study is only as good as the LR it *chooses*, measured on fresh runs
(docs/design/benchmarking.md); the best single noisy run it saw is the luckiest draw among
many. So for each task (the built-in ``mnist1d`` CNN with plain SGD, ``charlm`` with AdamW, sizes in
:data:`TASKS`), on 1 CPU thread:

1. **grid**: every LR of a log grid over the task's range trained once (model seed 0) at the
   full budget; its choice is the point with the lowest score (the default objective).
2. **re-evaluation**: the better half of the grid by that score, re-run with fresh seeds
   1-3 (model initialisation and data order), full budget. The *truth* of an LR is its mean
   final validation loss over those seeds; ``best by mean`` is the grid LR whose truth is
   lowest.
3. **tune_lr**: ``trials`` trials over the same range (TPE, the ``halving`` pruner, and on
   MNIST-1D the default ``median`` too, the default objective, model seed 0) for
   each of 3 sampler seeds; its chosen LR is re-run with seeds 1-3. Regret = its truth / the truth
   of the grid's choice; compute = its examples / the
   grid's examples.
4. **lr="auto"**: for model seeds 1-3, :func:`autobatch.tune.auto_lr.choose_base_lr` (what
   ``fit(lr="auto")`` runs) then a full fit at its LR, against the fit at the best-by-mean
   grid LR with the same seed. Compute = study + run, over one run.
5. **objectives**: from the curves of the re-evaluated LRs (4 seeds each), how well each
   candidate score of one run predicts the LR's truth over the other seeds: the expected
   regret of picking the lowest score (one random seed per LR, 2,000 draws), at the full
   budget and at the rungs a pruner would judge (1/8, 1/4, 1/2 of it), and how often the
   truly best LR sits in the top third there (what a rung with reduction factor 3 keeps).

Compute is in training examples processed (evaluation passes are not counted).

    python benchmarks/tune.py                 # both tasks, about 25 min on 2 shared cores
    python benchmarks/tune.py --quick         # a smoke run (not the reported figures)

Writes ``benchmarks/results/tune.json``; ``--cache`` keeps finished runs, so an interrupted
benchmark resumes where it stopped.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

import autobatch
from autobatch.evaluate import evaluate
from autobatch.registry import get_problem
from autobatch.train.callbacks import Callback
from autobatch.tune.auto_lr import choose_base_lr
from autobatch.tune.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, score

RESULTS = Path(__file__).resolve().parent / "results"
FRESH_SEEDS = (1, 2, 3)
N_EVALS = 8
EMA_HORIZON = 1 / 16  # of the budget: the weight average's time constant, in examples
PREFIXES = (1, 2, 4, 8)  # evaluations (of N_EVALS) a score is computed from
DRAWS = 2000


@dataclass(frozen=True)
class Task:
    """One task: an example, its budget, the grid and the tune_lr study size."""

    example: str
    options: dict
    epochs: float
    lr_range: tuple[float, float]
    grid_points: int
    trials: int
    metric: str  # the Must-show metric of lr="auto": val_accuracy (points) or val_loss (%)
    pruners: tuple[str, ...] = ("halving",)  # the first is scored against the target


TASKS = {
    # tune_lr's default pruner, median, for comparison on MNIST-1D only (time)
    "mnist1d": Task("mnist1d", {}, 10.0, (1e-3, 3.0), 20, 14, "val_accuracy", ("halving", "median")),
    # charlm sized for a shared 2-core CPU: 32-character windows, one pass over the text
    # (8,437 sequences, 264 steps at B0 = 32), ten grid points x1.67 apart.
    "charlm": Task("charlm", {"context": 32}, 1.0, (3e-4, 3e-2), 10, 7, "val_loss"),
}
QUICK = {
    "mnist1d": Task("mnist1d", {}, 1.0, (1e-2, 1.0), 5, 4, "val_accuracy", ("halving", "median")),
    "charlm": Task("charlm", {"context": 32, "max_chars": 60_000}, 2.0, (1e-3, 1e-2), 3, 3, "val_loss"),
}


class Curve(Callback):
    """Evaluates the raw weights and an exponential moving average of them (a candidate
    objective) at ``N_EVALS`` equal sample counts."""

    def __init__(self, model: torch.nn.Module, ex, total: int) -> None:
        self.model, self.ex = model, ex
        self.marks = [math.ceil(total * k / N_EVALS) for k in range(1, N_EVALS + 1)]
        self.horizon = EMA_HORIZON * total
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.avg = [torch.zeros_like(p) for p in self.params]
        self.weight = 0.0  # sum of the average's weights: dividing by it removes the zero start
        self.raw: list[float] = []
        self.ema: list[float] = []
        self.accuracy: list[float] = []
        self.samples = 0  # examples trained on so far (what a diverged run is charged)

    @torch.no_grad()
    def on_step_end(self, record) -> None:
        self.samples = record.samples
        beta = math.exp(-record.examples / self.horizon)
        for a, p in zip(self.avg, self.params):
            a.mul_(beta).add_(p, alpha=1 - beta)
        self.weight = beta * self.weight + (1 - beta)
        while self.marks and record.samples >= self.marks[0]:
            self.marks.pop(0)
            metrics = self.ex.evaluate(self.model, self.ex.val_data)
            self.raw.append(metrics["val_loss"])
            self.accuracy.append(metrics.get("val_accuracy", math.nan))
            saved = [p.clone() for p in self.params]
            for a, p in zip(self.avg, self.params):
                p.copy_(a / self.weight)
            self.ema.append(evaluate(self.model, self.ex.val_data, self.ex.loss_fn)["val_loss"])
            for s, p in zip(saved, self.params):
                p.copy_(s)


def train(task: Task, lr: float, seed: int) -> dict:
    """One full-budget fit at ``lr`` with model and data-order seed ``seed``, with its curve."""
    ex = get_problem(task.example, seed=seed, **task.options)
    total = round(task.epochs * len(ex.train_data[1]))
    model = ex.model_fn()
    curve = Curve(model, ex, total)
    start = time.perf_counter()
    try:
        result = autobatch.fit(model, ex.train_data, loss_fn=ex.loss_fn, optimizer=ex.optimizer, lr=lr,
                               max_samples=total, initial_batch_size=ex.default_batch_size, seed=seed,
                               progress=False, callbacks=[curve])
        samples, diverged = result.samples, False
    except FloatingPointError:
        samples, diverged = curve.samples, True
    final = ex.evaluate(model, ex.val_data)
    ok = not diverged and len(curve.raw) == N_EVALS and math.isfinite(final["val_loss"])
    return {"lr": lr, "seed": seed, "samples": samples, "diverged": diverged,
            "final": final["val_loss"] if ok else None, "final_metrics": final if ok else None,
            "raw": curve.raw, "ema": curve.ema, "accuracy": curve.accuracy,
            "wall_time_s": round(time.perf_counter() - start, 2)}


class Cache:
    """Finished runs by key, in a JSON file when ``path`` is given (resume after a crash)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.data = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}

    def get(self, key: str, make) -> Any:
        if key not in self.data:
            self.data[key] = make()
            if self.path:
                self.path.write_text(json.dumps(self.data))
        return self.data[key]


def run_task(name: str, task: Task, cache: Cache, log) -> dict:
    ex = get_problem(task.example, seed=0, **task.options)
    n = len(ex.train_data[1])
    total = round(task.epochs * n)
    low, high = task.lr_range
    lrs = [float(x) for x in np.logspace(math.log10(low), math.log10(high), task.grid_points)]

    spent = {}  # seconds each cached or fresh piece of work took when it ran, by key

    def fit_at(lr: float, seed: int) -> dict:
        key = f"{name}/fit/{lr!r}/{seed}"
        run = cache.get(key, lambda: train(task, lr, seed))
        spent[key] = run["wall_time_s"]
        log(f"{name} lr={lr:.4g} seed={seed}: final {_f(run['final'])} ({run['wall_time_s']:.0f} s)")
        return run

    # 1. the grid, seed 0
    grid = [fit_at(lr, 0) for lr in lrs]
    grid_samples = sum(g["samples"] for g in grid)
    grid_score = {g["lr"]: _score(g, DEFAULT_OBJECTIVE) for g in grid}
    grid_choice = min(lrs, key=lambda lr: grid_score[lr])
    # 2. re-evaluation of the better half
    ranked = sorted(lrs, key=lambda lr: grid_score[lr])
    reeval = sorted(ranked[: math.ceil(len(lrs) / 2)])
    runs = {lr: [fit_at(lr, s) for s in FRESH_SEEDS] for lr in reeval}
    truth = {lr: _truth(rs) for lr, rs in runs.items()}
    best_by_mean = min(reeval, key=lambda lr: truth[lr])
    ref = truth[grid_choice]

    # 3. tune_lr, per pruner and sampler seed
    tuned = []
    for pruner in task.pruners:
        for seed in range(3):
            def study(seed=seed, pruner=pruner) -> dict:
                t0 = time.perf_counter()
                result = autobatch.tune_lr(
                    ex.model_fn, ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data, n_trials=task.trials,
                    trial_length=total, trial_unit="samples", lr_range=task.lr_range, optimizer=ex.optimizer,
                    storage=optuna.storages.InMemoryStorage(), study_name=f"{name}-{pruner}-{seed}", seed=seed,
                    pruner=pruner, n_evals=N_EVALS, config={"initial_batch_size": ex.default_batch_size,
                                                            "seed": 0, "progress": False})
                states = [row.state for row in result.trials]
                return {"pruner": pruner, "seed": seed, "lr": result.best_lr, "score": result.best_value,
                        "samples": result.total_samples, "complete": states.count("COMPLETE"),
                        "pruned": states.count("PRUNED"), "trials": [row.model_dump() for row in result.trials],
                        "wall_time_s": round(time.perf_counter() - t0, 1)}
            key = f"{name}/tune/{pruner}/{task.trials}/{seed}"
            entry = dict(cache.get(key, study))
            spent[key] = entry["wall_time_s"]
            log(f"{name} tune_lr {pruner} seed {seed}: lr {entry['lr']:.4g}, {entry['samples']} examples")
            entry["runs"] = [fit_at(entry["lr"], s) for s in FRESH_SEEDS]
            entry["truth"] = _truth(entry["runs"])
            entry["regret"] = entry["truth"] / ref
            entry["regret_vs_best_by_mean"] = entry["truth"] / truth[best_by_mean]
            entry["compute_ratio"] = entry["samples"] / grid_samples
            tuned.append(entry)
    scored = [t for t in tuned if t["pruner"] == task.pruners[0]]

    # 4. lr="auto", per model seed, against the fit at the best-by-mean grid LR (same seed)
    auto = []
    for i, seed in enumerate(FRESH_SEEDS):
        def emulate(seed=seed) -> dict:
            sx = get_problem(task.example, seed=seed, **task.options)
            model = sx.model_fn()
            search = choose_base_lr(model, sx.train_data, loss_fn=sx.loss_fn, val_data=sx.val_data,
                                    optimizer=sx.optimizer, max_samples=total,
                                    config={"initial_batch_size": sx.default_batch_size, "seed": seed,
                                            "progress": False})
            return {"seed": seed, "lr": search.lr, "refined": search.refined, "study_samples": search.samples,
                    "study_wall_time_s": round(search.wall_time_s, 1), "candidates": search.candidates,
                    "rungs": search.rungs, "survivors": search.survivors,
                    "trials": [row.model_dump() for row in search.trials]}
        entry = dict(cache.get(f"{name}/auto/{seed}", emulate))
        spent[f"{name}/auto/{seed}"] = entry["study_wall_time_s"]
        run = fit_at(entry["lr"], seed)  # the model's initial weights are the seed's, as fit gets them
        best = runs[best_by_mean][i]
        entry.update(final=run["final"], metrics=run["final_metrics"], run_samples=run["samples"],
                     best_lr_final=best["final"], best_lr_metrics=best["final_metrics"],
                     compute_ratio=(entry["study_samples"] + run["samples"]) / best["samples"])
        log(f"{name} lr=auto seed {seed}: lr {entry['lr']:.4g}, {task.metric} "
            f"{_f((run['final_metrics'] or {}).get(task.metric))} vs {_f(best['final_metrics'][task.metric])}")
        auto.append(entry)

    # 5. the objectives, from the re-evaluated curves (seed 0 from the grid, seeds 1-3)
    curves = {lr: [next(g for g in grid if g["lr"] == lr), *runs[lr]] for lr in reeval}
    objectives = objective_study(curves)
    return {
        "setup": {**asdict(task), "lr_range": list(task.lr_range), "train_examples": n,
                  "val_examples": len(ex.val_data[1]), "samples_per_run": total,
                  "initial_batch_size": ex.default_batch_size, "optimizer": ex.optimizer.__name__.strip("_"),
                  "objective": DEFAULT_OBJECTIVE, "pruners": list(task.pruners), "n_evals": N_EVALS,
                  "fresh_seeds": list(FRESH_SEEDS)},
        "grid": [{"lr": g["lr"], "score": grid_score[g["lr"]], "final": g["final"], "samples": g["samples"],
                  "reevaluated": g["lr"] in runs, "truth": truth.get(g["lr"]),
                  "truth_sem": _sem(runs[g["lr"]]) if g["lr"] in runs else None} for g in grid],
        "grid_samples": grid_samples, "grid_choice": grid_choice, "grid_choice_truth": ref,
        "best_by_mean": best_by_mean, "best_by_mean_truth": truth[best_by_mean],
        "tune_lr": [{k: v for k, v in t.items() if k != "runs"} | {"finals": [r["final"] for r in t["runs"]]}
                    for t in tuned],
        "auto": auto, "objectives": objectives,
        "work_wall_time_s": sum(spent.values()),  # the runs' own times, however many invocations they took
        "summary": {
            "median_regret": statistics.median(t["regret"] for t in scored),
            "median_compute_ratio": statistics.median(t["compute_ratio"] for t in scored),
            "auto_mean_gap": _auto_gap(auto, task.metric),
            "auto_max_compute_ratio": max(a["compute_ratio"] for a in auto),
        },
    }


def objective_study(curves: dict[float, list[dict]]) -> dict:
    """For each candidate score and prefix: expected regret of the argmin, P(regret <= 2%),
    P(the best LR is in the top third), seed-to-seed spread at the good LRs (see module doc)."""
    lrs = sorted(curves)
    finals = {lr: [r["final"] if r["final"] is not None else math.inf for r in rs] for lr, rs in curves.items()}
    n_seeds = min(len(v) for v in finals.values())
    names = [*OBJECTIVES, "tail4", "ema"]
    rng = np.random.default_rng(0)
    draws = rng.integers(n_seeds, size=(DRAWS, len(lrs)))
    table = {}
    for name in names:
        for upto in PREFIXES:
            scores = {lr: [_score(r, name, upto) for r in rs] for lr, rs in curves.items()}
            regrets, top3 = [], []
            for draw in draws:
                pick = {lr: int(draw[i]) for i, lr in enumerate(lrs)}
                truth = {lr: _mean_inf([f for j, f in enumerate(finals[lr]) if j != pick[lr]]) for lr in lrs}
                best_truth = min(truth.values())
                chosen = min(lrs, key=lambda lr: scores[lr][pick[lr]])
                regrets.append(truth[chosen] / best_truth)
                order = sorted(lrs, key=lambda lr: scores[lr][pick[lr]])
                top3.append(min(lrs, key=lambda lr: truth[lr]) in order[: max(1, math.ceil(len(lrs) / 3))])
            good = sorted(lrs, key=lambda lr: _mean_inf(finals[lr]))[:3]
            spread = [float(np.std(scores[lr]) / np.mean(scores[lr])) for lr in good
                      if all(map(math.isfinite, scores[lr]))]
            table[f"{name}@{upto}"] = {
                "objective": name, "evals": upto, "mean_regret": float(np.mean(regrets)),
                "median_regret": float(np.median(regrets)), "p_within_2pct": float(np.mean(np.array(regrets) <= 1.02)),
                "p_best_in_top_third": float(np.mean(top3)), "cv_at_best_lrs": float(np.mean(spread)) if spread else None,
            }
    return table


def _score(run: dict, name: str, upto: int = N_EVALS) -> float:
    """A run's score under a candidate objective from its first ``upto`` evaluations."""
    raw, ema = run["raw"][:upto], run["ema"][:upto]
    if run["diverged"] or len(raw) < upto or not all(map(math.isfinite, raw)):
        return math.inf
    if name == "ema":
        return ema[-1]
    if name == "tail4":
        return float(np.mean(raw[-4:]))
    return score(name, raw, N_EVALS)


def _truth(runs: list[dict]) -> float | None:
    finals = [r["final"] if r["final"] is not None else math.inf for r in runs]
    return _mean_inf(finals)


def _mean_inf(values: list[float]) -> float:
    return math.inf if not all(map(math.isfinite, values)) else float(np.mean(values))


def _sem(runs: list[dict]) -> float | None:
    finals = [r["final"] for r in runs]
    if any(f is None for f in finals):
        return None
    return float(np.std(finals, ddof=1) / math.sqrt(len(finals)))


def _auto_gap(auto: list[dict], metric: str) -> float | None:
    """Mean over seeds of lr="auto"'s metric minus the best LR's (accuracy: points; loss: relative)."""
    pairs = [(a["metrics"][metric], a["best_lr_metrics"][metric]) for a in auto if a["metrics"] and a["best_lr_metrics"]]
    if len(pairs) < len(auto):
        return None
    if metric == "val_accuracy":
        return 100 * float(np.mean([a - b for a, b in pairs]))
    return float(np.mean([a / b - 1 for a, b in pairs]))


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def working_tree() -> dict:
    """The commit, and whether autobatch/ had uncommitted edits."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=30, check=False,
                                  cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--", "autobatch").splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not the reported figures)")
    parser.add_argument("--cache", default=None, help="JSON file of finished runs (resume after a crash)")
    parser.add_argument("--out", default=str(RESULTS / "tune.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = QUICK if args.quick else TASKS
    names = list(tasks) if args.task == "all" else [args.task]
    cache = Cache(args.cache)
    started = time.perf_counter()
    load = [os.getloadavg()[0]]

    def log(msg: str) -> None:
        load.append(os.getloadavg()[0])
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    out = {"benchmark": "tune", "quick": args.quick, "tasks": {}}
    for name in names:
        t0 = time.perf_counter()
        out["tasks"][name] = run_task(name, tasks[name], cache, log)
        out["tasks"][name]["wall_time_s"] = time.perf_counter() - t0
    out.update(
        working_tree=working_tree(), total_wall_time_s=time.perf_counter() - started,
        work_wall_time_s=sum(t["work_wall_time_s"] for t in out["tasks"].values()),
        machine={"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "optuna": optuna.__version__, "threads": torch.get_num_threads(),
                 "load_average_median": statistics.median(load), "load_average_max": max(load)},
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(_finite(out), indent=1))
    for name, res in out["tasks"].items():
        s = res["summary"]
        print(f"{name}: tune_lr median regret {s['median_regret']:.3f} at {s['median_compute_ratio']:.2f} of the "
              f"grid's compute; lr=auto gap {s['auto_mean_gap']}, compute <= {s['auto_max_compute_ratio']:.2f} runs")
    print(f"wrote {args.out} ({out['total_wall_time_s'] / 60:.1f} min; the runs took "
          f"{out['work_wall_time_s'] / 60:.1f} min when they ran)")


def _finite(obj: Any) -> Any:
    """inf/NaN as None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
