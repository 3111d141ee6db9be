"""The critical batch measured directly by branched training, next to the noise scales.

For each task, a reference run at batch ``B0`` and LR ``lr0`` saves its model and optimizer
state at a few fractions of its budget (the *points*). From each point, *branches* train on at
``B = k * B0`` for ``k`` in ``--factors`` over the same number of examples (the *window*), each
with the LR the task's rule gives (``lr0 * k`` for SGD, ``lr0 * sqrt(k)`` for Adam and Muon)
times each multiplier of a small grid, and with several data orders (seeds). A branch's held-out loss
is read at fixed numbers of examples.

B_crit from the branches (McCandlish et al. 2018, eq. 2.11). At a point, the target loss is what
the B0 branches (best LR, mean over seeds) reach after a quarter of the window. For each B, the
examples ``E(B)`` to reach it are read off the seed-averaged loss curve of that B's best LR
(first crossing of its running minimum, linearly interpolated); ``S(B) = E(B) / B`` steps. The
frontier ``(S/S_min - 1)(E/E_min - 1) = 1`` is ``E(B) = E_min + S_min * B``, a straight line in
``B``: a least-squares fit gives ``E_min`` and ``S_min`` and ``B_crit = E_min / S_min``, the batch
at which a step is worth half its examples (twice the minimum examples, twice the minimum steps).
A second reading that needs no fit, the *tolerance rule*: the largest B of the grid whose E(B)
is at most twice the smallest E measured. Were that smallest E the frontier's E_min, this would
be B_crit rounded down to the grid; it is E(B0) = E_min (1 + B0/B_crit), so on the frontier the
rule reads B_crit + 2 B0 rounded down: a check on the fit that leans high when B_crit is near B0.
A B that never reaches the target within the window needs more than 4x the
B0 examples: it is past ~3 B_crit and is left out of the fit.

The noise scales at each point, at the frozen parameters, over the training set (or its first
``--noise-examples``): ``B_simple = tr(Sigma) / |G|^2`` from ``|G|^2`` (the mean gradient) and
the mean ``|G_b|^2`` of disjoint batches of ``--noise-batch`` examples (``E|G_b|^2 = |G|^2 +
tr(Sigma)/b * (N-b)/N`` without replacement); raw for every task, and for AdamW in Adam's
geometry too (the gradients weighted by ``1/(sqrt(v_hat)+eps)`` from the point's optimizer
state). Each is reported as a ratio to the measured B_crit.

    python -m benchmarks.critical_batch                  # all tasks, ~50 min on 2 shared cores
    python -m benchmarks.critical_batch --tasks mnist1d  # one task
    python -m benchmarks.critical_batch --replot         # the plot again from the JSON

Writes ``benchmarks/results/critical_batch.json`` and one plot per task,
``critical_batch_<task>.png`` (examples to the target against B at each point, with the fitted
frontier and the noise scales).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autobatch.evaluate import evaluate
from autobatch.muon import MuonAdamW, muon_param_groups
from autobatch.noise.preconditioned import adam_preconditioner
from autobatch.registry import get_problem
from benchmarks._run_info import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "critical_batch.json"


@dataclass(frozen=True)
class Task:
    """One problem, optimizer and protocol.

    ``budget`` is the reference run's length in examples; ``points`` the fractions of it where
    branches start; ``window`` each branch's length as a fraction of ``budget``; ``lr_grid`` the
    multipliers of the rule's LR each branch size tries; ``evals`` the loss readings per window.
    """

    problem: str
    optimizer: str  # "sgd" | "adamw" | "muon"
    b0: int
    lr0: float
    rule: str  # "linear" | "sqrt"
    budget: int
    window: float
    lr_grid: tuple[float, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    points: tuple[float, ...] = (0.05, 0.2, 0.5)
    evals: int = 16
    val_examples: int | None = None
    adamw_lr: float | None = None  # Muon tasks: AdamW's LR at B0 (for embeddings, head, norms)
    seeds: tuple[int, ...] = (1, 2)  # the branches' data orders (``--seeds`` overrides)


TASKS: dict[str, Task] = {
    # The problem's tuned LR (0.2 at B=16). SGD's rule is linear; the grid goes down from it to
    # no scaling at all at 16 x B0 (linear at 16x diverges on this problem).
    "mnist1d": Task("mnist1d", "sgd", 16, 0.2, "linear", budget=40 * 4000, window=0.1,
                    lr_grid=(1.0, 0.5, 0.25, 0.125, 0.0625), seeds=(1, 2, 3, 4, 5, 6)),
    # The problem's LR (3e-3 at B=32), by the square root at B0=8; the grid straddles the rule
    # (a first run with x4..x0.5 never chose x4 and often chose x0.5, so it goes one lower).
    "charlm-adamw": Task("charlm", "adamw", 8, 1.5e-3, "sqrt", budget=8 * 4200, window=0.12,
                         lr_grid=(2.0, 1.0, 0.5, 0.25), val_examples=256, seeds=(1, 2, 3, 4)),
    "charlm-muon": Task("charlm", "muon", 8, 0.01, "sqrt", budget=8 * 4200, window=0.12,
                        lr_grid=(2.0, 1.0, 0.5, 0.25), val_examples=256, adamw_lr=1.5e-3, seeds=(1, 2, 3, 4)),
}


def rule_factor(rule: str, k: float) -> float:
    """The LR multiplier a rule gives at ``k`` times the base batch."""
    if rule == "linear":
        return k
    if rule == "sqrt":
        return math.sqrt(k)
    raise ValueError(f"rule must be 'linear' or 'sqrt' (got {rule!r})")


def make_optimizer(task: Task, model: nn.Module, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The task's optimizer on ``model`` with every LR multiplied by ``lr_scale``."""
    if task.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=task.lr0 * lr_scale)
    if task.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=task.lr0 * lr_scale, weight_decay=0.01)
    if task.optimizer == "muon":
        adamw_lr = task.adamw_lr if task.adamw_lr is not None else task.lr0
        return MuonAdamW(muon_param_groups(model, lr=task.lr0 * lr_scale, adamw_lr=adamw_lr * lr_scale))
    raise ValueError(f"optimizer must be 'sgd', 'adamw' or 'muon' (got {task.optimizer!r})")


def set_lr_scale(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], scale: float) -> None:
    """Set each param group's LR to its base LR times ``scale``."""
    for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = lr * scale


# ---------------------------------------------------------------------------------------------
# The noise scale at frozen parameters


def noise_scale_at(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int,
    weights: Mapping[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """``B_simple`` of ``model`` over ``data`` (mean-reduced loss), from disjoint batches.

    ``|G|^2`` is the squared norm of the mean of the batch gradients (every example counted
    once: ``len(data)`` is cut to a multiple of ``batch``); ``tr(Sigma)`` comes from the mean
    ``|G_b|^2`` through ``E|G_b|^2 = |G|^2 + tr(Sigma_s)/b * (N-b)/N`` (batches drawn without
    replacement), where ``Sigma_s`` is the sample covariance (``1/(N-1)``) of the ``N``
    per-example gradients; with ``batch=1`` the result is exact. ``weights`` (per parameter, the
    parameter's shape) measures in a preconditioned geometry: every gradient multiplied by them
    element-wise before its norm. The model is left in train mode with no gradient.

    Returns:
        ``{"grad_sq": |G|^2, "trace_cov": tr(Sigma_s), "noise_scale": tr(Sigma_s)/|G|^2,
        "examples": N, "batch": b}``.
    """
    x, y = data
    n = (len(x) // batch) * batch
    if n < 2 * batch:
        raise ValueError(f"need at least 2 batches of {batch} examples (got {len(x)} examples)")
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    sq_sum = 0.0
    model.train()
    for start in range(0, n, batch):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[start:start + batch]), y[start:start + batch]).backward()
        grads = [p.grad if weights is None else p.grad * weights[p] for p in params]
        sq_sum += float(sum((g.double() ** 2).sum() for g in grads))
        for t, g in zip(total, grads, strict=True):
            t += g
    model.zero_grad(set_to_none=True)
    count = n // batch
    grad_sq = float(sum(((t.double() / count) ** 2).sum() for t in total))
    mean_small = sq_sum / count
    trace_cov = (mean_small - grad_sq) * batch * n / (n - batch)
    return {"grad_sq": grad_sq, "trace_cov": trace_cov, "noise_scale": trace_cov / grad_sq,
            "examples": n, "batch": batch}


# ---------------------------------------------------------------------------------------------
# Examples to a target and the frontier fit


def examples_to_target(examples: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """Examples at which the running minimum of ``losses`` first reaches ``target``.

    ``examples`` are the reading positions (increasing, the first normally 0); between two
    readings the loss is interpolated linearly. None when the target is never reached.
    """
    best = math.inf
    prev_e, prev_l = None, None
    for e, raw in zip(examples, losses, strict=True):
        loss = min(best, raw)
        if loss <= target:
            if prev_e is None or prev_l is None or prev_l == loss:
                return float(e)
            return float(prev_e + (e - prev_e) * (prev_l - target) / (prev_l - loss))
        best, prev_e, prev_l = loss, e, loss
    return None


def fit_frontier(batches: Sequence[float], examples: Sequence[float]) -> dict[str, Any]:
    """Least-squares fit of ``E(B) = E_min + S_min * B`` (McCandlish et al.'s frontier).

    Returns ``{"e_min", "s_min", "b_crit", "bound"}``: ``b_crit = E_min / S_min`` when both are
    positive (``bound`` None); otherwise what the grid shows: ``bound = "above"`` when the
    examples do not grow with B (``S_min <= 0``: every B was below the critical batch, b_crit
    is None) or ``"below"`` when they grow faster than linearly from the smallest B (``E_min <=
    0``: the smallest B is already past it). Needs two distinct batch sizes.
    """
    b = np.asarray(batches, dtype=float)
    e = np.asarray(examples, dtype=float)
    if len(np.unique(b)) < 2:
        raise ValueError(f"the fit needs two distinct batch sizes (got {list(batches)})")
    slope, intercept = np.polyfit(b, e, 1)
    out: dict[str, Any] = {"e_min": float(intercept), "s_min": float(slope), "b_crit": None, "bound": None}
    if slope <= 0:
        out["bound"] = "above"
    elif intercept <= 0:
        out["bound"] = "below"
    else:
        out["b_crit"] = float(intercept / slope)
    return out


def tolerance_b_crit(batches: Sequence[int], examples: Sequence[float | None], factor: float = 2.0) -> int | None:
    """The largest B whose examples to the target are at most ``factor`` x the smallest measured
    (None when no B reached the target); see the module's docstring for how it relates to B_crit."""
    reached = [(b, e) for b, e in zip(batches, examples, strict=True) if e is not None]
    if not reached:
        return None
    least = min(e for _, e in reached)
    return max(b for b, e in reached if e <= factor * least)


# ---------------------------------------------------------------------------------------------
# Training


def _batches(n: int, batch: int, generator: torch.Generator):  # type: ignore[no-untyped-def]
    """Index batches of ``batch`` from endless reshuffled passes over ``n`` examples."""
    while True:
        order = torch.randperm(n, generator=generator)
        for s in range(0, n - batch + 1, batch):
            yield order[s:s + batch]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int,
    examples: int,
    seed: int,
    on_examples: Sequence[int] = (),
    callback: Callable[[int], None] | None = None,
) -> None:
    """``examples // batch`` plain steps; ``callback(seen)`` each time ``seen`` passes a mark of
    ``on_examples`` (a sequence of example counts, increasing) and at 0."""
    x, y = data
    marks = list(on_examples)
    if callback is not None and marks and marks[0] == 0:
        callback(0)
        marks.pop(0)
    seen = 0
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for idx in _batches(len(x), batch, gen):
        if seen + batch > examples:
            break
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
        seen += batch
        while callback is not None and marks and seen >= marks[0]:
            callback(seen)
            marks.pop(0)


def val_loss(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], loss_fn: Callable[..., torch.Tensor]) -> float:
    """Mean loss over ``data`` in eval mode (:func:`autobatch.evaluate.evaluate`, modes restored)."""
    return evaluate(model, data, loss_fn, accuracy=False)["val_loss"]


def run_task(name: str, task: Task, factors: Sequence[int], seeds: Sequence[int], noise_batch: int,
             noise_examples: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Reference run, branches and noise scales of one task; the JSON's entry for it."""
    torch.manual_seed(0)
    ex = get_problem(task.problem, seed=0, **dict(task.options))
    train_data = ex.train_data
    vx, vy = ex.val_data
    if task.val_examples is not None:
        vx, vy = vx[: task.val_examples], vy[: task.val_examples]
    model = ex.model_fn()
    opt = make_optimizer(task, model)
    base_lrs = [g["lr"] for g in opt.param_groups]
    window = int(task.window * task.budget)
    marks = sorted({int(f * task.budget) for f in task.points})
    states: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

    def save(seen: int) -> None:
        states[seen] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))

    start = time.perf_counter()
    train(model, opt, train_data, ex.loss_fn, task.b0, max(marks) + task.b0, seed=1000, on_examples=marks, callback=save)
    noise_data = (train_data[0][:noise_examples], train_data[1][:noise_examples])
    points = []
    for fraction, mark in zip(sorted(task.points), marks, strict=True):
        seen_at = min(s for s in states if s >= mark)
        model_state, opt_state = states[seen_at]
        model.load_state_dict(model_state)
        ref_opt = make_optimizer(task, model)
        ref_opt.load_state_dict(opt_state)
        scales = {"raw": noise_scale_at(model, noise_data, ex.loss_fn, noise_batch)}
        if task.optimizer == "adamw":
            scales["adam"] = noise_scale_at(model, noise_data, ex.loss_fn, noise_batch, adam_preconditioner(ref_opt))
        start_loss = val_loss(model, (vx, vy), ex.loss_fn)
        readings = [round(window * i / task.evals) for i in range(task.evals + 1)]
        branches = []
        for k in factors:
            b = task.b0 * k
            for mult in task.lr_grid:
                curves = []
                for seed in seeds:
                    model.load_state_dict(model_state)
                    opt_b = make_optimizer(task, model)
                    opt_b.load_state_dict(opt_state)  # restores the saved LRs: set them after
                    set_lr_scale(opt_b, base_lrs, rule_factor(task.rule, k) * mult)
                    curve: list[tuple[int, float]] = []
                    train(model, opt_b, train_data, ex.loss_fn, b, window, seed=seed, on_examples=readings,
                          callback=lambda seen, curve=curve: curve.append((seen, val_loss(model, (vx, vy), ex.loss_fn))))
                    curves.append(curve)
                length = min(len(c) for c in curves)
                examples = [curves[0][i][0] for i in range(length)]
                mean = [float(np.mean([c[i][1] for c in curves])) for i in range(length)]
                finite = all(math.isfinite(v) for v in mean)
                branches.append({"k": k, "batch": b, "lr_mult": mult,
                                 "lr": task.lr0 * rule_factor(task.rule, k) * mult,
                                 "examples": examples, "loss": mean if finite else None,
                                 "per_seed_final": [c[-1][1] for c in curves]})
                log(f"{name} point {fraction:.0%} B={b} lr x{mult}: final {mean[-1]:.4f}")
        model.load_state_dict(model_state)
        points.append(summarise_point(fraction, seen_at, start_loss, branches, scales, task.b0, window))
        log(f"{name} point {fraction:.0%}: " + json.dumps({k: v for k, v in points[-1].items() if k != 'branches'}))
    return {"task": name, "problem": task.problem, "options": dict(task.options), "optimizer": task.optimizer,
            "b0": task.b0, "lr0": task.lr0, "adamw_lr": task.adamw_lr, "rule": task.rule, "budget": task.budget,
            "window": window, "lr_grid": list(task.lr_grid), "factors": list(factors), "seeds": list(seeds),
            "val_examples": len(vx), "train_examples": len(train_data[0]), "noise_batch": noise_batch,
            "noise_examples": min(noise_examples, len(train_data[0])),
            "wall_s": time.perf_counter() - start, "points": points}


def summarise_point(fraction: float, seen: int, start_loss: float, branches: list[dict[str, Any]],
                    scales: Mapping[str, Mapping[str, float]], b0: int, window: int) -> dict[str, Any]:
    """B_crit at one point from its branches (target, E(B) per B at its best LR, the fit)."""
    # The target: what B0 at its best LR (lowest final loss) reaches after a quarter of the window.
    base = [br for br in branches if br["k"] == 1 and br["loss"] is not None]
    ref = min(base, key=lambda br: br["loss"][-1])
    quarter = window / 4
    target = float(np.interp(quarter, ref["examples"], np.minimum.accumulate(ref["loss"])))
    per_b = []
    for b in sorted({br["batch"] for br in branches}):
        tries = []
        for br in branches:
            if br["batch"] == b and br["loss"] is not None:
                tries.append((examples_to_target(br["examples"], br["loss"], target), br))
        reached = [(e, br) for e, br in tries if e is not None]
        if reached:
            e, best = min(reached, key=lambda t: t[0])
            per_b.append({"batch": b, "examples": e, "steps": e / b, "lr_mult": best["lr_mult"], "lr": best["lr"]})
        else:
            per_b.append({"batch": b, "examples": None, "steps": None, "lr_mult": None, "lr": None})
    fit_rows = [r for r in per_b if r["examples"] is not None]
    fit = fit_frontier([r["batch"] for r in fit_rows], [r["examples"] for r in fit_rows]) if len(fit_rows) >= 2 else \
        {"e_min": None, "s_min": None, "b_crit": None, "bound": "below"}
    tol = tolerance_b_crit([r["batch"] for r in per_b], [r["examples"] for r in per_b])
    b_crit = fit["b_crit"]
    ratios = {g: (s["noise_scale"] / b_crit if b_crit else None) for g, s in scales.items()}
    return {"fraction": fraction, "examples_seen": seen, "start_loss": start_loss, "target_loss": target,
            "per_batch": per_b, "fit": fit, "tolerance_b_crit": tol, "noise": dict(scales),
            "ratios": ratios, "max_batch": max(r["batch"] for r in per_b), "b0": b0, "branches": branches}


# ---------------------------------------------------------------------------------------------
# Plot and entry point


def plot(data: Mapping[str, Any], out: Path) -> list[Path]:
    """One figure per task, ``<out stem>_<task>.png``: E(B) to the target against B at each
    point, the fitted frontier, and the noise scales as vertical lines. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for entry in data["tasks"]:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, point in enumerate(entry["points"]):
            colour = f"C{i}"
            rows = [r for r in point["per_batch"] if r["examples"] is not None]
            ax.plot([r["batch"] for r in rows], [r["examples"] for r in rows], "o", color=colour,
                    label=f"{point['fraction']:.0%} of the budget: B_crit {_fmt(point['fit']['b_crit'])}")
            fit = point["fit"]
            if fit["s_min"] is not None:
                bs = np.geomspace(entry["b0"], point["max_batch"], 50)
                ax.plot(bs, fit["e_min"] + fit["s_min"] * bs, "-", color=colour, alpha=0.6)
            for g, style in (("raw", ":"), ("adam", "--")):
                if g in point["noise"]:
                    ax.axvline(point["noise"][g]["noise_scale"], color=colour, linestyle=style, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (examples)")
        ax.set_ylabel("examples to the point's target loss")
        geometry = "dotted: raw B_simple" + ("; dashed: Adam's" if entry["optimizer"] == "adamw" else "")
        ax.set_title(f"{entry['task']} ({entry['optimizer']}): points and frontier fits\n{geometry}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{entry['task']}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="the branches' data orders (default: the task's, 6 for mnist1d and 4 for charlm)")
    p.add_argument("--noise-batch", type=int, default=32)
    p.add_argument("--noise-examples", type=int, default=4096)
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every task's budget (tests: 0.05)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--replot", action="store_true", help="redraw the plot from --out and exit")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out)
        return
    torch.set_num_threads(1)
    previous = json.loads(args.out.read_text())["tasks"] if args.out.exists() else []
    entries = {e["task"]: e for e in previous}
    for name in args.tasks:
        task = TASKS[name]
        if args.budget_scale != 1.0:
            task = dataclasses.replace(task, budget=max(task.b0 * 64, int(task.budget * args.budget_scale)))
        seeds = args.seeds if args.seeds is not None else task.seeds
        entries[name] = run_task(name, task, args.factors, seeds, args.noise_batch, args.noise_examples)
        data = {"commit": git_commit(),
                "tasks": [entries[n] for n in TASKS if n in entries]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, args.out)


if __name__ == "__main__":
    main()
