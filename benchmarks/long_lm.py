"""Long-horizon language model: steps, samples and wall time to the best tuned fixed batch's
final loss (issue 11).

The task is the built-in character transformer (``autobatch.problems.charlm``: AdamW, the
whole standard-library text, ~315k characters) trained for :data:`EPOCHS` epochs, long
enough that the gradient noise scale ``B_simple`` grows >= 10x over the run (measured by the
``pilot`` phase: fixed B = 16 with the estimator on; the growth is the median noise scale of
the last 10% of ready steps over that of the first 5%). Every run uses 1 torch thread, one
process at a time, and the same sample budget. Arms:

1. ``fixed``: B in :data:`SIZES`, each with its LR tuned on seed 0 over a x2 grid of 3 LRs,
   widened until the best final loss is interior; the best LR per size re-run on seeds 1-3.
   ``policy="fixed"``, estimator off, no LR scaling (the baseline at its fastest settings).
2. ``ramp``: batch warm-up from the smallest size to the largest (x2 at each milestone of
   :data:`RAMP_MILESTONES`, as Megatron and OLMo ramp the batch), at the smallest size's tuned
   LR with the default fit's LR rule (linear, capped at ``max_lr_factor`` 2); ``ramp-constant-lr``:
   the same ramp with the LR left alone (``lr_scaling="none"``); seeds 1-3.
3. ``default``: ``autobatch.fit`` with its defaults (policy ``budget``) from B0 = the
   smallest size at its tuned LR; ``gns``: the same with ``policy="gns"``; seeds 1-3.

The arms of 2 and 3 (:data:`ARMS`) run on to :data:`OVERRUN` x the budget, since the Must
show allows 1.2x the samples; their final loss is read at the budget.

The model is evaluated on the held-out text every 1/:data:`EVALS` of the budget (in samples)
and at the end; wall time excludes evaluation. The best fixed B (lowest mean final loss over
seeds 1-3) sets the target = its mean final loss; every run's steps, samples and wall time
to first reach it are interpolated on its eval curve, and divided by the best fixed B's
median figures over its run. Must show (issue 11): the default reaches the target in <= 0.6x the
steps at <= 1.2x the samples and less wall time, median of 3 seeds.

    python -m benchmarks.long_lm                  # all 42 runs, ~40 min on 1 core (45-60 s a run)
    python -m benchmarks.long_lm --phase pilot    # the noise-scale growth check, ~2 min
    python -m benchmarks.long_lm --phase summary  # recompute the summary from the runs

Each run is merged into ``benchmarks/results/long_lm.json`` as soon as it ends and a run
already there is not repeated, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import autobatch
from autobatch.problems import Problem
from autobatch.registry import get_problem
from autobatch.train.callbacks import Callback
from benchmarks._run_info import git_commit

OUT = Path(__file__).resolve().parent / "results" / "long_lm.json"

CHARS = 320_000  # the whole text (load_text cuts at the end of the modules, ~315k characters)
EPOCHS = 12.0
SIZES = (16, 32, 64, 128)
SEEDS = (1, 2, 3)
EVALS = 20  # evaluations per run, evenly spaced in samples
RAMP_MILESTONES = [1, 3, 6]  # epochs; B x2 at each: 16 -> 32 -> 64 -> 128
START_LR = {16: 1.5e-3, 32: 3e-3, 64: 4e-3, 128: 6e-3}  # first grid centre per size
PILOT_LRS = (2e-3, 1e-3)  # the noise-scale check at B = 16: 8.1x growth at 2e-3, 13x at 1e-3
# The Must show allows 1.2x the samples: the non-fixed arms run on to 1.2x the budget (their
# policies do not depend on the budget's size), their final loss read at the budget.
OVERRUN = 1.2
CRITERIA = {"steps_ratio": 0.6, "samples_ratio": 1.2, "wall_ratio": 1.0}
MACHINE = ("2 CPU cores shared with another job timing benchmarks on the other core; 1 torch thread, "
           "one benchmark process at a time")


# -- maths (plain functions) -------------------------------------------------------------------------
def reach(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """Step, samples and wall time at which the eval ``curve`` (dicts with ``loss``, ``step``,
    ``samples``, ``wall_s``, in order) first falls to ``target``, each linearly interpolated
    in loss between the last finite eval above it and the first at or below it; None if none
    is. A ``loss`` of None (non-finite) is skipped."""
    keys = ("step", "samples", "wall_s")
    p = None  # the last finite evaluation above the target
    for c in curve:
        if c["loss"] is None:  # a non-finite evaluation neither counts nor anchors the interpolation
            continue
        if c["loss"] <= target:
            if p is None:
                return {k: c[k] for k in keys}
            w = (p["loss"] - target) / (p["loss"] - c["loss"])
            return {k: p[k] + w * (c[k] - p[k]) for k in keys}
        p = c
    return None


def growth(noise: list[float]) -> dict[str, float] | None:
    """Noise-scale growth over a run: the median of the last 10% of ready (finite) values over
    the median of the first 5%."""
    ready = [x for x in noise if math.isfinite(x)]
    if len(ready) < 20:
        return None
    first = statistics.median(ready[: max(1, len(ready) // 20)])
    last = statistics.median(ready[-max(1, len(ready) // 10):])
    return {"first": first, "last": last, "growth": last / first, "ready_steps": len(ready)}


# -- one run -----------------------------------------------------------------------------------------
class _Evaluator(Callback):
    """Evaluates every ``every`` samples and at the first step reaching ``budget`` samples
    (marked ``at_budget``), and records the curve; wall time excludes evaluation."""

    def __init__(self, ex: Problem, model: torch.nn.Module, every: int, budget: int) -> None:
        self.ex, self.model, self.every, self.budget = ex, model, every, budget
        self.next, self.eval_s = every, 0.0
        self.curve: list[dict[str, Any]] = []

    def evaluate(self, step: int, samples: int, wall_s: float) -> None:
        t0 = time.perf_counter()
        loss = self.ex.evaluate(self.model, self.ex.val_data)["val_loss"]
        point: dict[str, Any] = {"step": step, "samples": samples, "wall_s": round(wall_s - self.eval_s, 3),
                                 "loss": loss if math.isfinite(loss) else None}
        if samples >= self.budget and not any(c.get("at_budget") for c in self.curve):
            point["at_budget"] = True
        self.curve.append(point)
        self.eval_s += time.perf_counter() - t0

    def on_step_end(self, record: Any) -> None:
        if record.samples >= self.next or (record.samples >= self.budget and not self.at_budget()):
            self.evaluate(record.step, record.samples, record.wall_time_s)
            self.next = (record.samples // self.every + 1) * self.every

    def at_budget(self) -> dict[str, Any] | None:
        """The evaluation at the budget (the last one if the run stopped short of it)."""
        return next((c for c in self.curve if c.get("at_budget")), None)


def example(seed: int) -> Problem:
    """The task: charlm on the whole text, model initialised from ``seed``."""
    return get_problem("charlm", seed=seed, max_chars=CHARS)


def run_one(arm: str, batch_size: int, lr: float, seed: int, overrides: dict[str, Any],
            overrun: float = 1.0) -> dict[str, Any]:
    """One fit of :data:`EPOCHS` x ``overrun`` epochs; returns its row (curve, figures at the
    budget of :data:`EPOCHS` epochs, totals, B trajectory)."""
    ex = example(seed)
    n = len(ex.train_data[0])
    model = ex.model_fn()
    ev = _Evaluator(ex, model, every=math.ceil(EPOCHS * n / EVALS), budget=int(EPOCHS * n))
    t0 = time.perf_counter()
    r = autobatch.fit(model, ex.train_data, loss_fn=ex.loss_fn, optimizer=ex.optimizer, lr=lr,
                      epochs=EPOCHS * overrun, initial_batch_size=batch_size, seed=seed, progress=False,
                      callbacks=[ev], **overrides)
    total = time.perf_counter() - t0
    if not ev.curve or ev.curve[-1]["step"] != r.steps:
        ev.evaluate(r.steps, r.samples, r.history[-1].wall_time_s)
    at = ev.at_budget() or ev.curve[-1]
    upto = [h for h in r.history if h.step <= at["step"]]
    changes = [(h.step, h.examples, round(h.lr, 7)) for i, h in enumerate(r.history)
               if i == 0 or (h.examples, h.lr) != (r.history[i - 1].examples, r.history[i - 1].lr)]
    noise = [h.noise_scale for h in upto]
    row = {
        "arm": arm, "batch_size": batch_size, "lr": lr, "seed": seed, "overrides": overrides, "overrun": overrun,
        # at the budget (EPOCHS epochs); the curve may go on to EPOCHS x overrun
        "final_loss": at["loss"], "steps": at["step"], "samples": at["samples"], "wall_s": at["wall_s"],
        "max_batch_size": max(h.batch_size for h in upto), "final_batch_size": upto[-1].batch_size,
        "final_lr": upto[-1].lr,
        "end": {"steps": r.steps, "samples": r.samples, "wall_s": ev.curve[-1]["wall_s"]},
        "eval_s": round(ev.eval_s, 2), "total_s": round(total, 2),
        "curve": ev.curve, "trajectory": changes[:60], "noise_growth": growth(noise),
    }
    if any(math.isfinite(x) for x in noise):  # a thinned noise-scale trace (every ~1% of steps)
        stride = max(1, len(noise) // 100)
        row["noise_trace"] = [(upto[i].step, round(noise[i], 3)) for i in range(0, len(noise), stride)
                              if math.isfinite(noise[i])]
    return row


# -- the JSON ----------------------------------------------------------------------------------------
def _key(row: dict[str, Any]) -> tuple:
    return (row["arm"], row["batch_size"], row["lr"], row["seed"])


def load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}


def save_run(row: dict[str, Any]) -> None:
    """Merge one finished run into the JSON, written before the summary is recomputed, so a
    failing summary never loses a measured run (``--phase summary`` recomputes it later)."""
    data = load()
    data["runs"] = [x for x in data["runs"] if _key(x) != _key(row)] + [row]
    data.update(settings())
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    data["summary"] = summarise(data["runs"])
    OUT.write_text(json.dumps(data, indent=1) + "\n")


def settings() -> dict[str, Any]:
    return {
        "task": {
            "example": "charlm",
            "max_chars": CHARS,
            "epochs": EPOCHS,
            "evals": EVALS,
            "model": "the example's defaults: 2 layers, d_model 64, 4 heads, context 64, 117k parameters",
            "optimizer": "AdamW, weight_decay 0.01, constant LR",
        },
        "sizes": list(SIZES),
        "seeds": list(SEEDS),
        "start_lr": {str(b): v for b, v in START_LR.items()},
        "ramp_milestones": RAMP_MILESTONES,
        "criteria": CRITERIA,
        "overrun": OVERRUN,
        "machine": MACHINE,
        "commit": git_commit(),
    }


def _run(arm: str, batch_size: int, lr: float, seed: int, overrides: dict[str, Any],
         overrun: float = 1.0) -> dict[str, Any]:
    done = {_key(x): x for x in load()["runs"]}
    key = (arm, batch_size, lr, seed)
    if key in done:
        return done[key]
    row = run_one(arm, batch_size, lr, seed, overrides, overrun)
    save_run(row)
    print(f"{arm:8s} B={batch_size:<4d} lr={lr:<8.3g} seed={seed} loss={row['final_loss']:.4f} "
          f"steps={row['steps']} maxB={row['max_batch_size']} wall={row['wall_s']:.1f}s", flush=True)
    return row


FIXED = {"policy": "fixed", "gns_method": "off", "lr_scaling": "none"}
_RAMP = {"policy": "ramp", "lr_milestones": RAMP_MILESTONES, "lr_decay": 0.5, "max_batch_size": SIZES[-1],
         "gns_method": "off"}
#: The arms that start at the smallest size with its tuned LR (fit overrides); run to OVERRUN x budget.
ARMS: dict[str, dict[str, Any]] = {
    "default": {},
    "gns": {"policy": "gns"},
    "ramp": {**_RAMP, "lr_scaling": "linear"},  # the default fit's rule for AdamW (budget: linear, x2 cap)
    "ramp-constant-lr": {**_RAMP, "lr_scaling": "none"},  # Megatron's ramp leaves the LR alone
}


def tuned_lrs(runs: list[dict[str, Any]]) -> dict[int, float]:
    """Per size, the LR with the lowest final loss among the seed-0 tuning runs."""
    out = {}
    for b in SIZES:
        tries = [r for r in runs if r["arm"] == "tune" and r["batch_size"] == b and r["final_loss"] is not None]
        if tries:
            out[b] = min(tries, key=lambda r: r["final_loss"])["lr"]
    return out


def tune(b: int) -> float:
    """Seed-0 x2 grid of 3 LRs around :data:`START_LR`, widened until the best is interior."""
    ks = {-1, 0, 1}
    while True:
        losses = {}
        for k in sorted(ks):
            row = _run("tune", b, START_LR[b] * 2.0**k, 0, FIXED)
            losses[k] = row["final_loss"] if row["final_loss"] is not None else math.inf
        best = min(losses, key=losses.get)
        if best == max(ks):
            ks.add(best + 1)
        elif best == min(ks):
            ks.add(best - 1)
        else:
            return START_LR[b] * 2.0**best


def pilot() -> list[dict[str, Any]]:
    """Fixed B = the smallest size with the estimator on, at each of :data:`PILOT_LRS` (seed 0)."""
    return [_run("pilot", SIZES[0], lr, 0, {"policy": "fixed", "gns_method": "micro", "lr_scaling": "none"})
            for lr in PILOT_LRS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", nargs="+", default=["pilot", "tune", "fixed", *ARMS],
                   choices=["pilot", "tune", "fixed", *ARMS, "summary"],
                   help="what to run (runs already in the JSON are kept); 'summary' only recomputes it")
    args = p.parse_args()
    torch.set_num_threads(1)
    if "pilot" in args.phase:
        for row in pilot():
            print(f"pilot lr={row['lr']:g}: noise-scale growth {row['noise_growth']}", flush=True)
    if "tune" in args.phase:
        for b in SIZES:
            print(f"tuned B={b}: lr={tune(b):g}", flush=True)
    lrs = tuned_lrs(load()["runs"])
    b0 = SIZES[0]
    for seed in SEEDS:  # seed-major, so a cut-short benchmark has whole seeds of every arm
        if "fixed" in args.phase:
            for b in SIZES:
                _run("fixed", b, lrs[b], seed, FIXED)
        for arm, overrides in ARMS.items():
            if arm in args.phase:
                _run(arm, b0, lrs[b0], seed, overrides, OVERRUN)
    data = load()
    # the commit is that of the last run written (save_run); recomputing the summary keeps it
    data.update({k: v for k, v in settings().items() if k != "commit" or "commit" not in data})
    data["summary"] = summarise(data["runs"])
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data["summary"], indent=1))


# -- the summary -------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: final loss, and steps/samples/wall to the target as ratios of the best fixed B."""
    out: dict[str, Any] = {"tuned_lr": {str(b): lr for b, lr in tuned_lrs(runs).items()}}
    out["pilot"] = [{"batch_size": r["batch_size"], "lr": r["lr"], "final_loss": r["final_loss"], **r["noise_growth"]}
                    for r in sorted(runs, key=lambda r: -r["lr"]) if r["arm"] == "pilot" and r["noise_growth"]]
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if (r["arm"] == "fixed" or r["arm"] in ARMS) and r["seed"] in SEEDS:
            label = f"fixed B={r['batch_size']}" if r["arm"] == "fixed" else r["arm"]
            arms.setdefault(label, []).append(r)
    fixed = {k: v for k, v in arms.items() if k.startswith("fixed") and len(v) == len(SEEDS)}
    if not fixed:
        return out
    best = min(fixed, key=lambda k: statistics.mean(r["final_loss"] for r in fixed[k]))
    target = statistics.mean(r["final_loss"] for r in fixed[best])
    ref = {k: statistics.median(r[k] for r in fixed[best]) for k in ("steps", "samples", "wall_s")}
    out.update({"best_fixed": best, "target_loss": target, "reference": ref})
    table = {}
    for label, rows in arms.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        losses = [r["final_loss"] for r in rows]
        per_seed = []
        for r in rows:
            hit = reach(r["curve"], target)
            per_seed.append({"seed": r["seed"], "reached": hit,
                             "ratios": None if hit is None else {"steps": hit["step"] / ref["steps"],
                                 "samples": hit["samples"] / ref["samples"], "wall_s": hit["wall_s"] / ref["wall_s"]}})
        ratios = [s["ratios"] for s in per_seed]
        med = None
        if len(rows) == len(SEEDS):
            # a seed that never reaches the target counts as infinitely far (the median may still be finite)
            med = {k: statistics.median(x[k] if x else math.inf for x in ratios) for k in ("steps", "samples", "wall_s")}
        table[label] = {
            "seeds": len(rows), "lr": rows[0]["lr"], "final_loss_mean": statistics.mean(losses),
            "final_loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "steps": [r["steps"] for r in rows], "samples": [r["samples"] for r in rows],
            "wall_s": [r["wall_s"] for r in rows], "max_batch_size": [r["max_batch_size"] for r in rows],
            "per_seed": per_seed, "median_ratios": med,
            "must_show": None if med is None else {
                "steps": med["steps"] <= CRITERIA["steps_ratio"],
                "samples": med["samples"] <= CRITERIA["samples_ratio"],
                "wall": med["wall_s"] < CRITERIA["wall_ratio"]},
        }
    out["arms"] = table
    return out


if __name__ == "__main__":
    main()
