"""Optimizer steps and samples to a target: adaptive batch sizes against tuned fixed batches.

For each task (the built-in ``mnist1d`` CNN with plain SGD, the ``charlm`` transformer with
AdamW) this runs, on 1 CPU thread:

1. a fixed-B sweep where every B gets its own LR: a log grid (x2 steps) searched from the
   best LR of the next smaller B, widened until the best LR is interior (seed 0 only; the
   score is optimizer steps to the target; a tuning run is abandoned once it has taken more
   steps than the best LR so far without reaching the target);
2. every tuned fixed B, fixed B0 with step LR decay, the Smith et al. ramp and the adaptive
   policies (``gns`` with several LR rules and noise multipliers, ``goodput``) over every
   seed, each for ``budget_epochs`` (the final metric is read there) and on to at most
   ``cap_epochs`` if the target is not reached by then.

The model is evaluated on the held-out set at geometrically spaced steps (every 2% of the
step count), so steps to a target are resolved to about 2%. Steps, samples (examples
processed) and training wall time (evaluation excluded) are recorded when the target is
first met. The fixed-B medians are fitted to ``S = S_min + E_min / B``, the trade-off curve
``(S/S_min - 1)(E/E_min - 1) = 1`` of McCandlish et al. (2018), and every other run is placed
against it. A second, longer-horizon target is derived from the fixed runs: the best
fixed-B median metric at ``budget_epochs``, relaxed by ``long_slack``.

    python benchmarks/time_to_target.py --task all            # about 40 min on 2 shared cores
    python benchmarks/time_to_target.py --task mnist1d --quick  # a 2-minute smoke run

Results are merged per task into ``benchmarks/results/time_to_target.json`` (two tasks may run
as separate processes); the plot ``time_to_target.png`` is redrawn from that file.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import autobatch
from autobatch.problems import Problem
from autobatch.registry import get_problem
from autobatch.train.callbacks import Callback, StopTraining

try:
    from benchmarks._run_info import short_commit
except ImportError:  # run as a script (python benchmarks/time_to_target.py): benchmarks/ is on the path
    from _run_info import short_commit  # type: ignore[no-redef]

RESULTS = Path(__file__).resolve().parent / "results"
COMMIT = short_commit()  # the code each run used
SUSTAIN = 2  # a target counts as reached at the first of this many consecutive evaluations meeting it


@dataclass(frozen=True)
class TaskSpec:
    """Benchmark settings of one task. Epochs are passes over the training set."""

    sizes: tuple[int, ...]  # fixed global batch sizes of the sweep
    budget_epochs: float  # the final metric is read here
    cap_epochs: float  # a run that has not met the target by budget continues up to here
    max_batch_size: int  # bound for the adaptive policies
    milestones: tuple[int, ...]  # epochs: step decay (fixed) / batch growth (ramp)
    decay: float  # LR factor (fixed) or 1/growth (ramp) per milestone
    long_slack: float  # the long target is the best fixed median relaxed by this
    adaptive: tuple[tuple[str, dict[str, Any]], ...]  # (label, fit overrides)
    step_decay: bool = True  # include fixed B0 with step LR decay
    ramp: bool = True  # include the Smith et al. ramp
    widen: bool = True  # widen the LR grid until the best LR is interior (else 3 points)
    quick_sizes: tuple[int, ...] = ()
    quick_adaptive: tuple[str, ...] = ()


FASTEST_FIXED = {"policy": "fixed", "gns_method": "off", "lr_scaling": "none"}

TASKS: dict[str, TaskSpec] = {
    "mnist1d": TaskSpec(
        sizes=(16, 32, 64, 128, 256), budget_epochs=15, cap_epochs=60, max_batch_size=1024,
        milestones=(3, 6, 12), decay=0.5, long_slack=0.005,
        adaptive=(
            ("default (budget)", {}),  # fit's defaults: the budget policy, linear LR rule
            ("default (gns_every=auto)", {"gns_every": "auto"}),  # measured steps within 5% of the time
            ("gns/adascale", {"policy": "gns", "lr_scaling": "adascale"}),
            ("gns/linear", {"policy": "gns", "lr_scaling": "linear"}),
            ("gns/adascale x0.5", {"policy": "gns", "lr_scaling": "adascale", "noise_multiplier": 0.5}),
            ("gns/adascale x2", {"policy": "gns", "lr_scaling": "adascale", "noise_multiplier": 2.0}),
            ("goodput/adascale", {"policy": "goodput", "lr_scaling": "adascale"}),
        ),
        quick_sizes=(16, 64, 256), quick_adaptive=("gns/adascale",),
    ),
    "charlm": TaskSpec(  # slimmed to fit a contended 2-core CPU: 2 sizes, 3-point grid, no ramp
        sizes=(32, 128), budget_epochs=7, cap_epochs=20, max_batch_size=512,
        milestones=(1, 2, 4), decay=0.5, long_slack=0.02,
        adaptive=(("default (budget)", {}), ("gns/sqrt", {"policy": "gns", "lr_scaling": "sqrt"})),
        step_decay=False, ramp=False, widen=False,
        quick_sizes=(32, 128), quick_adaptive=("gns/sqrt",),
    ),
}


# -- maths (plain functions) -----------------------------------------------------------------------
def meets(value: float, target: float, higher_is_better: bool) -> bool:
    """Whether ``value`` reaches ``target`` (NaN never does)."""
    if value is None or not math.isfinite(value):  # None: a NaN read back from the JSON
        return False
    return value >= target if higher_is_better else value <= target


def first_reach(curve: list[dict[str, float]], target: float, higher_is_better: bool,
                sustain: int = SUSTAIN) -> dict | None:
    """The first evaluation of ``curve`` (dicts with ``metric``) that starts ``sustain``
    consecutive evaluations meeting ``target`` (so one lucky spike of a noisy run does not
    count), or None."""
    run = 0
    for i, c in enumerate(curve):
        run = run + 1 if meets(c["metric"], target, higher_is_better) else 0
        if run == sustain:
            return curve[i - sustain + 1]
    return None


def final_value(curve: list[dict[str, float]], budget_samples: int, window: float = 0.1) -> float | None:
    """Median metric over the evaluations in the last ``window`` of the budget (samples in
    ``[(1 - window) budget, budget]``, the evaluation at the budget included)."""
    values = [c["metric"] for c in curve if ((1 - window) * budget_samples <= c["samples"] <= budget_samples
              or c.get("at_budget")) and c["metric"] is not None]
    return statistics.median(values) if values else None


def fit_tradeoff(sizes: list[float], steps: list[float]) -> tuple[float, float]:
    """Fit ``S(B) = S_min + E_min / B`` to fixed-batch steps to target.

    This is McCandlish et al.'s curve ``(S/S_min - 1)(E/E_min - 1) = 1`` with ``E = B S``
    (``B_crit = E_min / S_min``). Least squares on relative error (each point weighted by
    ``1/S``), with both parameters kept >= 0 (a negative one is set to 0 and the other refit).

    Returns:
        ``(S_min, E_min)``: steps and samples (examples).
    """
    b = np.asarray(sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.size < 2:
        raise ValueError(f"fit_tradeoff needs >= 2 batch sizes (got sizes={list(sizes)})")
    w = 1.0 / s
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1) * w[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(design, s * w, rcond=None)
    if s_min < 0:
        s_min, e_min = 0.0, float(np.sum(w * w * s / b) / np.sum(w * w / b**2))
    elif e_min < 0:
        s_min, e_min = float(np.sum(w * w * s) / np.sum(w * w)), 0.0
    return float(s_min), float(e_min)


def curve_steps(samples: float, s_min: float, e_min: float) -> float:
    """Steps the fitted curve needs when spending ``samples`` examples: ``S_min E/(E - E_min)``
    (inf at or below ``E_min``, where no fixed batch gets there)."""
    return s_min * samples / (samples - e_min) if samples > e_min else math.inf


# -- one run -------------------------------------------------------------------------------------
class _Tracker(Callback):
    """Evaluates at geometrically spaced steps, records the curve, reads the metric at the
    budget, and stops at the target (tuning), after budget and target, or past a step limit."""

    def __init__(self, ex: Problem, model: torch.nn.Module, *, budget_samples: int | None,
                 step_limit: int | None, ratio: float = 1.02, first: int = 10) -> None:
        self.ex, self.model = ex, model
        self.budget_samples, self.step_limit = budget_samples, step_limit
        self.ratio, self.next_eval = ratio, first
        self.curve: list[dict[str, float]] = []
        self.final: dict[str, float] | None = None
        self.eval_s = 0.0
        self.reached = False

    def on_step_end(self, record) -> None:  # record: a StepRecord
        at_budget = self.budget_samples is not None and self.final is None \
            and record.samples >= self.budget_samples
        if record.step >= self.next_eval or at_budget:
            self._evaluate(record, at_budget)
        if self.reached and (self.budget_samples is None or self.final is not None):
            raise StopTraining("target reached")
        if self.step_limit is not None and record.step >= self.step_limit and not self.reached:
            raise StopTraining("step limit")

    def _evaluate(self, record, at_budget: bool) -> None:
        t0 = time.perf_counter()
        metrics = self.ex.evaluate(self.model, self.ex.val_data)
        train_wall = record.wall_time_s - self.eval_s
        self.eval_s += time.perf_counter() - t0
        value = metrics[self.ex.metric_name]
        self.curve.append({"step": record.step, "samples": record.samples,
                           "wall_s": round(train_wall, 3), "metric": value})
        self.reached = self.reached or first_reach(self.curve[-SUSTAIN:], self.ex.target,
                                                   self.ex.higher_is_better) is not None
        if at_budget:
            self.curve[-1]["at_budget"] = True
            self.final = {"step": record.step, "samples": record.samples, "metric": value,
                          "median_last_10pct": final_value(self.curve, self.budget_samples)}
        self.next_eval = max(record.step + 1, math.ceil(record.step * self.ratio))


def run_one(ex: Problem, spec: TaskSpec, *, label: str, batch_size: int, lr: float, seed: int,
            overrides: dict[str, Any], tuning: bool = False, step_limit: int | None = None) -> dict:
    """Train once; returns the run's record (curve, target reach, final metric, B trajectory).

    ``tuning``: stop as soon as the target is met (no budget metric). Otherwise run to
    ``budget_epochs``, and on to ``cap_epochs`` until the target is met.
    """
    n = len(ex.train_data[0])
    model = ex.model_fn()
    tracker = _Tracker(ex, model, budget_samples=None if tuning else int(spec.budget_epochs * n),
                       step_limit=step_limit)
    settings = {"initial_batch_size": batch_size, "max_batch_size": max(batch_size, spec.max_batch_size),
                "progress": False, "seed": seed, **overrides}
    diverged = False
    t0 = time.perf_counter()
    try:
        result = autobatch.fit(model, ex.train_data, loss_fn=ex.loss_fn, optimizer=ex.optimizer, lr=lr,
                               max_samples=int(spec.cap_epochs * n), callbacks=[tracker], **settings)
        steps, samples = result.steps, result.samples
        trajectory = [(r.step, r.batch_size, round(r.lr, 6)) for i, r in enumerate(result.history)
                      if i == 0 or (r.batch_size, r.lr) != (result.history[i - 1].batch_size, result.history[i - 1].lr)]
    except FloatingPointError:
        diverged, steps, samples, trajectory = True, None, None, []
    reach = first_reach(tracker.curve, ex.target, ex.higher_is_better)
    return {
        "label": label, "batch_size": batch_size, "lr": lr, "seed": seed,
        "overrides": overrides, "diverged": diverged,
        "reached": reach, "final": tracker.final, "steps": steps, "samples": samples,
        "seconds": round(time.perf_counter() - t0, 2), "autobatch_commit": COMMIT,
        "trajectory": _thin(trajectory), "curve": tracker.curve,
    }


def _thin(trajectory: list[tuple], keep: int = 80) -> list[tuple]:
    """At most ``keep`` (step, B, lr) change points, evenly picked, first and last kept."""
    if len(trajectory) <= keep:
        return trajectory
    idx = np.unique(np.linspace(0, len(trajectory) - 1, keep).round().astype(int))
    return [trajectory[i] for i in idx]


# -- the protocol --------------------------------------------------------------------------------
def tune_lr(ex: Problem, spec: TaskSpec, batch_size: int, start_lr: float, *, quick: bool,
            log: list[dict]) -> float | None:
    """The LR on the x2 grid through ``start_lr`` with the fewest steps to target at
    ``batch_size`` (seed 0), widened until that LR has a worse neighbour on both sides.
    None if no LR reaches the target."""
    scores: dict[int, float] = {}  # k -> steps to target (inf: not reached / abandoned)

    def score(k: int) -> None:
        finite = [v for v in scores.values() if math.isfinite(v)]
        lr = start_lr * 2.0**k
        run = run_one(ex, spec, label=f"tune B={batch_size}", batch_size=batch_size, lr=lr, seed=0,
                      overrides={"policy": "fixed"}, tuning=True,
                      step_limit=int(min(finite)) if finite else None)
        scores[k] = run["reached"]["step"] if run["reached"] else math.inf
        log.append({"batch_size": batch_size, "lr": lr, "steps_to_target": _num(scores[k]),
                    "diverged": run["diverged"], "seconds": run["seconds"]})
        print(f"  tune B={batch_size:<4d} lr={lr:<9.4g} steps={scores[k]}", flush=True)

    for k in (0, -1, 1):
        score(k)
    for _ in range(0 if quick else 6):
        finite = {k: v for k, v in scores.items() if math.isfinite(v)}
        if not finite:  # nothing reached: widen both ways
            score(min(scores) - 1)
            score(max(scores) + 1)
            continue
        best = min(finite, key=finite.get)
        if best == max(scores):
            score(best + 1)
        elif best == min(scores):
            score(best - 1)
        else:
            break
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    return start_lr * 2.0 ** min(finite, key=finite.get) if finite else None


def run_task(name: str, seeds: list[int], quick: bool, previous: dict | None = None,
             only: set[str] | None = None) -> dict:
    """Tune, then run every configuration over ``seeds``; returns the task's JSON record.

    With ``previous`` (the task's record from the JSON) and ``only`` (labels), nothing is
    tuned: the previous tuned LRs are reused, only the ``only`` configurations run, and their
    runs replace the previous ones of the same labels."""
    spec = TASKS[name]
    ex = get_problem(name, seed=0)
    sizes = spec.sizes if not quick else spec.quick_sizes
    if quick:
        spec = TaskSpec(**{**spec.__dict__, "budget_epochs": spec.budget_epochs / 3})
    start = time.perf_counter()
    tuning_log: list[dict] = []
    tuned: dict[int, float | None] = {}
    lr = ex.default_lr
    if previous is not None:
        tuning_log = previous["tuning"]
        tuned = {int(b): v for b, v in previous["tuned_lr"].items()}
    for b in sizes if previous is None else ():
        tuned[b] = tune_lr(ex, spec, b, lr, quick=quick or not spec.widen, log=tuning_log)
        lr = tuned[b] or lr
    b0 = ex.default_batch_size
    base_lr = tuned.get(b0) or ex.default_lr
    configs: list[tuple[str, int, float, dict[str, Any]]] = [
        # Baselines at their fastest settings: nothing to measure at a fixed batch (and no LR
        # rule to apply: B stays B0).
        (f"fixed B={b}", b, tuned[b], FASTEST_FIXED) for b in sizes
        if tuned[b] is not None
    ]
    milestones = list(spec.milestones)
    if spec.step_decay:
        configs.append((f"fixed B={b0} step decay", b0, base_lr,
                        {**FASTEST_FIXED, "lr_milestones": milestones, "lr_decay": spec.decay}))
    if spec.ramp:
        configs.append((f"ramp B0={b0}", b0, base_lr,
                        {"policy": "ramp", "lr_milestones": milestones, "lr_decay": spec.decay}))
    for label, overrides in spec.adaptive:
        if not quick or label in spec.quick_adaptive:
            configs.append((label, b0, base_lr, overrides))
    known = {c[0] for c in configs}
    if only is not None:
        unknown = only - known
        if unknown:
            raise ValueError(f"--only names unknown runs {sorted(unknown)}; known: {[c[0] for c in configs]}")
        configs = [c for c in configs if c[0] in only]
    runs = [r for r in previous["runs"] if r["label"] in known - only] if previous is not None else []
    for seed in seeds:
        seeded = get_problem(name, seed=seed)
        for label, b, lr_b, overrides in configs:
            run = run_one(seeded, spec, label=label, batch_size=b, lr=lr_b, seed=seed, overrides=overrides)
            runs.append(run)
            r = run["reached"]
            print(f"  seed={seed} {label:<24s} lr={lr_b:<8.4g} reached={'-' if r is None else (r['step'], r['samples'])}"
                  f" final={None if run['final'] is None else round(run['final']['metric'], 4)} "
                  f"({run['seconds']}s)", flush=True)
    record = {
        "metric": ex.metric_name, "higher_is_better": ex.higher_is_better, "target": ex.target,
        "train_examples": len(ex.train_data[0]), "val_examples": len(ex.val_data[0]),
        "base_batch_size": b0, "seeds": seeds, "quick": quick,
        "spec": {k: v for k, v in spec.__dict__.items() if k not in ("quick_sizes", "quick_adaptive")},
        "tuned_lr": {str(b): v for b, v in tuned.items()}, "tuning": tuning_log, "runs": runs,
        "minutes": round((time.perf_counter() - start) / 60, 2)
        + (previous["minutes"] if previous is not None else 0.0),
    }
    return record


# -- summary -------------------------------------------------------------------------------------
def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _reach_at(run: dict, target: float, higher: bool) -> dict | None:
    return first_reach(run["curve"], target, higher)


def summarise(task: dict) -> dict:
    """Medians per configuration for both targets, the fitted curve, and the issue's criterion."""
    higher, labels = task["higher_is_better"], list(dict.fromkeys(r["label"] for r in task["runs"]))
    by_label = {lab: [r for r in task["runs"] if r["label"] == lab] for lab in labels}
    finals = {lab: _median([r["final"]["median_last_10pct"] for r in rs if r["final"]]) for lab, rs in by_label.items()}
    fixed = [lab for lab in labels if lab.startswith("fixed B=") and "decay" not in lab]
    best_fixed_final = (max if higher else min)(finals[lab] for lab in fixed if finals[lab] is not None)
    long_target = best_fixed_final - task["spec"]["long_slack"] * (1 if higher else -1)
    out: dict[str, Any] = {"best_fixed_final": best_fixed_final, "tuning": _tuning_summary(task["tuning"]),
                           "targets": {}}
    for tname, target in (("target", task["target"]), ("long", round(long_target, 4))):
        rows = {}
        for lab, rs in by_label.items():
            hits = [_reach_at(r, target, higher) for r in rs]
            got = [h for h in hits if h is not None]
            rows[lab] = {
                "batch_size": rs[0]["batch_size"], "lr": rs[0]["lr"], "reached": f"{len(got)}/{len(rs)}",
                "steps": _median([h["step"] for h in got]), "samples": _median([h["samples"] for h in got]),
                "wall_s": _median([h["wall_s"] for h in got]), "final": finals[lab],
                "per_seed": [None if h is None else [h["step"], h["samples"]] for h in hits],
            }
        pts = [(rows[lab]["batch_size"], rows[lab]["steps"]) for lab in fixed
               if rows[lab]["steps"] is not None and rows[lab]["reached"].split("/")[0] == rows[lab]["reached"].split("/")[1]]
        fitted = fit_tradeoff([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 2 else None
        for lab, row in rows.items():
            if fitted and row["steps"] is not None:
                s_min, e_min = fitted
                row["steps_over_curve"] = row["steps"] / curve_steps(row["samples"], s_min, e_min)
                row["curve_product"] = (row["steps"] / s_min - 1) * (row["samples"] / e_min - 1)
            if lab not in fixed and row["steps"] is not None:
                row["vs_fixed"] = _criterion(row, {f: rows[f] for f in fixed}, best_fixed_final, higher)
        out["targets"][tname] = {"value": target, "s_min": fitted and fitted[0], "e_min": fitted and fitted[1],
                                 "fit_points": pts, "rows": rows}
    return out


def _tuning_summary(log: list[dict]) -> dict[str, dict]:
    """Per batch size: the LRs tried with their steps to target (None: not reached within the
    best's steps, or diverged), the best LR, and whether it is interior to the grid."""
    out = {}
    log = [e for e in log if "lr" in e]  # (an earlier version also logged a per-size verdict)
    for b in sorted({e["batch_size"] for e in log}):
        tried = sorted((e["lr"], e["steps_to_target"]) for e in log if e["batch_size"] == b)
        reached = [(lr, s) for lr, s in tried if s is not None]
        best = min(reached, key=lambda x: x[1])[0] if reached else None
        out[str(b)] = {"tried": tried, "best_lr": best,
                       "interior": best is not None and tried[0][0] < best < tried[-1][0]}
    return out


def _criterion(row: dict, fixed_rows: dict, best_final: float, higher: bool) -> dict:
    """The issue's test: steps <= 0.5x those of the best (fewest-steps) fixed B that reached the
    target with no more samples than this run, and final metric within 0.5 points (accuracy)
    of the best fixed B's."""
    cheaper = [(lab, r) for lab, r in fixed_rows.items() if r["samples"] is not None and r["samples"] <= row["samples"]]
    out: dict[str, Any] = {"comparator": None, "steps_ratio": None}
    if cheaper:
        lab, r = min(cheaper, key=lambda x: x[1]["steps"])
        out.update(comparator=lab, steps_ratio=row["steps"] / r["steps"])
    out["final_gap"] = None if row["final"] is None else (best_final - row["final"]) * (1 if higher else -1)
    return out


# -- output --------------------------------------------------------------------------------------
def print_tables(name: str, task: dict) -> None:
    summary = task["summary"]
    print(f"\n== {name}: metric {task['metric']}, seeds {task['seeds']}, "
          f"budget {task['spec']['budget_epochs']} epochs, {task['minutes']} min")
    print("tuned LR (steps to target per LR tried; '-' = not reached within the best's steps):")
    for b, t in summary["tuning"].items():
        tried = ", ".join(f"{lr:g}:{'-' if st is None else st}" for lr, st in t["tried"])
        print(f"  B={b:<5s} best {t['best_lr']} ({'interior' if t['interior'] else 'AT GRID EDGE'}); {tried}")
    for tname, t in summary["targets"].items():
        print(f"-- target {t['value']} ({tname}); fit S_min={_fmt(t['s_min'])} E_min={_fmt(t['e_min'])}")
        print(f"{'run':<26s}{'lr':>8s}{'hit':>5s}{'steps':>8s}{'samples':>9s}{'wall s':>8s}"
              f"{'final':>8s}{'S/curve':>8s}{'vs fixed':>16s}{'final gap':>10s}")
        for lab, r in t["rows"].items():
            vs = r.get("vs_fixed")
            vs_s = "" if not vs or vs["steps_ratio"] is None else f"{vs['steps_ratio']:.2f}x {vs['comparator'][6:]}"
            gap = _fmt(vs["final_gap"], 4) if vs else ""
            print(f"{lab:<26s}{r['lr']:>8.3g}{r['reached']:>5s}{_fmt(r['steps']):>8s}{_fmt(r['samples']):>9s}"
                  f"{_fmt(r['wall_s']):>8s}{_fmt(r['final'], 4):>8s}{_fmt(r.get('steps_over_curve'), 2):>8s}"
                  f"{vs_s:>16s}{gap:>10s}")


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if digits else f"{x:,.0f}"


def plot(results: dict, path: Path) -> None:
    """Steps vs samples to target: fixed B per seed and median, the fitted curve, the rest marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4.6 * len(names)), squeeze=False)
    markers = "*^vDPXsph<>"
    panels = [(name, tname) for name in names for tname in ("target", "long")]
    for ax, (name, tname) in zip(axes.flat, panels):
        task = results[name]
        t = task["summary"]["targets"][tname]
        others = [lab for lab in t["rows"] if not (lab.startswith("fixed B=") and "decay" not in lab)]
        for lab, r in t["rows"].items():
            pts = [p for p in r["per_seed"] if p is not None]
            if not pts:
                continue
            if lab not in others:
                ax.scatter([p[1] for p in pts], [p[0] for p in pts], c="0.6", s=10, zorder=2)
                ax.scatter([r["samples"]], [r["steps"]], c="k", s=30, zorder=3)
                ax.annotate(lab[6:], (r["samples"], r["steps"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            else:
                i = others.index(lab)
                ax.scatter([r["samples"]], [r["steps"]], marker=markers[i % len(markers)], color=f"C{i}",
                           s=70, zorder=4, label=lab)
        if t["s_min"]:
            lo = t["e_min"] * 1.05
            hi = max(r["samples"] for r in t["rows"].values() if r["samples"]) * 1.5
            xs = np.geomspace(max(lo, 1.0), max(hi, lo * 2), 200)
            ax.plot(xs, [curve_steps(x, t["s_min"], t["e_min"]) for x in xs], "k--", lw=0.8,
                    label=f"fit: S_min={t['s_min']:.0f}, E_min={t['e_min']:.0f}")
        ax.set(xscale="log", yscale="log", xlabel="samples to target", ylabel="optimizer steps to target",
               title=f"{name}: {task['metric']} {'>=' if task['higher_is_better'] else '<='} {t['value']:g}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per configuration (default: 6 for mnist1d, 1 for charlm; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="few sizes, no grid widening, one adaptive run")
    parser.add_argument("--only", default=None,
                        help="comma-separated run labels to (re)run with the tuned LRs already in the "
                             "JSON, replacing their previous runs (e.g. 'gns/adascale,goodput/adascale')")
    parser.add_argument("--resummarise", action="store_true",
                        help="recompute summaries, tables and the plot from the JSON, train nothing")
    parser.add_argument("--out", default=None, help="JSON path (default results/time_to_target.json; "
                        "with --quick /tmp/time_to_target_quick.json); the PNG goes next to it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or ("/tmp/time_to_target_quick.json" if args.quick else RESULTS / "time_to_target.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(TASKS) if args.task == "all" else [args.task]
    if args.resummarise:
        results = json.loads(out.read_text()) if out.exists() else {}
        for name in names:  # a task whose summary failed left its raw runs
            raw = out.with_name(f"{out.stem}_{name}_raw.json")
            if raw.exists():
                results[name] = json.loads(raw.read_text())
        for name in [n for n in names if n in results]:
            results[name]["summary"] = summarise(results[name])
            print_tables(name, results[name])
        out.write_text(json.dumps(_clean(results), indent=1))
        plot(results, out.with_suffix(".png"))
        names = []
    for name in names:
        n_seeds = args.seeds or (1 if args.quick or name == "charlm" else 6)
        print(f"== {name}", flush=True)
        previous = None
        if args.only:
            previous = json.loads(out.read_text())[name]
            n_seeds = args.seeds or len(previous["seeds"])
        only = set(args.only.split(",")) if args.only else None
        record = run_task(name, list(range(n_seeds)), args.quick, previous, only)
        raw = out.with_name(f"{out.stem}_{name}_raw.json")  # kept only if the summary fails
        raw.write_text(json.dumps(_clean(record)))
        record["summary"] = summarise(record)
        print_tables(name, record)
        with open(Path(tempfile.gettempdir()) / f"{out.stem}.lock", "w") as lock:  # another task may be writing
            fcntl.flock(lock, fcntl.LOCK_EX)
            results = json.loads(out.read_text()) if out.exists() else {}
            results[name] = _clean(record)
            out.write_text(json.dumps(results, indent=1))
            plot(results, out.with_suffix(".png"))
        raw.unlink()
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
