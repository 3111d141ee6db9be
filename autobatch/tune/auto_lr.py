"""``lr="auto"``: choose the base LR with a short study, then train at it.

:func:`choose_base_lr` spends a fixed fraction of the run's compute (examples processed, at
most :data:`DEFAULT_FRACTION` = half of the run, so the study and the run together cost at
most 1.5 runs) on *synchronous successive halving* over a log grid of base LRs:

1. Candidates: LRs log-spaced over ``lr_range`` (by default a range for the optimizer's
   family, :func:`default_lr_range`), at most ``sqrt(2)`` apart, as many as the study's examples allow
   (:func:`plan_rungs`).
2. The last rung compares 2 trials after 1/8 of the run's examples
   (:data:`FINAL_FRACTION`; shorter comparisons measured misleading). Before it, rungs 4x
   shorter each keep the best third of their trials (or, where the run is too short for
   that, 2x shorter rungs keep the best half; :data:`SCHEDULES`): cheap rungs drop the LRs
   that barely move the loss or blow it up, the long one ranks the plausible ones. Survivors *continue*
   where they stopped (``autobatch.fit``'s checkpoints), so no example is trained twice.
   Trials see the same adaptive batch, LR rule, run length (the run's own stopping rules, a
   callback ending each segment) and data order as the run: with ``val_data`` given, a trial
   of ``r`` examples is the first ``r`` examples of a run at that LR. When the study's examples cannot give rung
   0 at least :data:`MIN_RUNG_STEPS` steps at the base batch, a single rung trains as many
   candidates as fit to 1/8 of the run (3 on a third of the study each if not even 2 fit).
3. Every rung ranks trials at equal numbers of examples by the objective ``"tail"``
   (:mod:`autobatch.tune.objectives`): the mean validation loss at 7/8 and at the end of
   the rung.
4. Two finalists that are grid neighbours give their geometric mean (their order after 1/8
   of the run is not to be trusted, :func:`_pick`); otherwise the better wins. A single rung
   of 3 or more: the best, moved toward the vertex of the parabola through its neighbours'
   scores (in log LR) by at most half a grid step.
5. Adam-like optimizers (:func:`default_lr_range`'s family) instead: the two finalists are
   the best trial and its *lower* grid neighbour, and the study settles half a grid step
   below the one that ranks first at the last rung (the lowest candidate stays as it is;
   a single rung: half a step below its best). A short trial favours a
   larger Adam LR than the whole run does (Bjorck et al. 2024, "Scaling optimal LR across
   token horizons": the best LR falls as the horizon grows). Measured on the charlm
   transformer (AdamW, 1 epoch, 15 LRs x1.44 apart, 3 seeds): the best LR after 1/16 and
   1/8 of the run was 3.75e-3 on every seed, from 5/16 of the run on 1.8e-3 (1.3-2.6e-3 per
   seed), the best LR of the whole run; the rule before this one let a 17-step rung drop
   1e-3 and settled on 5.6e-3 (+6.2% loss). The best trial's upper neighbour is never a
   finalist, so an LR above the short trials' best is never chosen.

The plan keeps the whole study, overshoot included, within the fraction. Trials are
recorded in an in-memory Optuna study (nothing is written but temporary checkpoints,
deleted at the end).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from autobatch.config import FitConfig
from autobatch.data import BatchSource, as_batch_source
from autobatch.evaluate import evaluate
from autobatch.optimizers import build_optimizer, copy_for
from autobatch.run_length import RunLength
from autobatch.train.callbacks import Callback, StopTraining
from autobatch.train.checkpoint import capture_rng, load_checkpoint, restore_rng
from autobatch.train.loop import train
from autobatch.tune.objectives import score
from autobatch.tune.study import TrialRow, TuneResult, _summarise

__all__ = ["DEFAULT_FRACTION", "VAL_FRACTION", "LRSearch", "choose_base_lr", "default_lr_range", "plan_rungs",
           "resumed_search"]

DEFAULT_FRACTION = 0.5
"""The most the study may train on, as a fraction of the run's examples."""

VAL_FRACTION = 0.1
"""Share of the training examples held out to score trials when no ``val_data`` is given."""

MIN_RUNG_STEPS = 16
"""Optimizer steps at the base batch every candidate gets at least, in the first rung."""

FINAL_FRACTION = 1 / 8
"""The last rung compares its trials after this share of the run's examples. Shorter
comparisons mislead: on MNIST-1D after 1/14 of the run the best LR of the full run still
looked worse than LRs half as large (its loss leaves the plateau later)."""

SCHEDULES = ((4, 3), (2, 2))
"""``(growth, keep)``: each rung trains its survivors ``growth`` times longer than the one
before and keeps the best ``1/keep`` of its trials (2 go into the last). Long rungs that keep
a third first; halving where the run is too short for rungs 4x apart."""

GRID_RATIO = math.sqrt(2.0)
"""The finest spacing of the candidate LRs."""

# Planned compute is this share of the allowed fraction: every trial segment ends at the first
# step past its budget, so it overshoots by less than one batch.
_PLAN_MARGIN = 0.9

# Optimizers whose update is normalised per coordinate (the LR is a step size in parameter
# units); their good LRs sit about two decades below plain SGD's.
_ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
             torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.RMSprop)
SGD_RANGE = (1e-3, 1.0)
ADAPTIVE_RANGE = (1e-4, 1e-2)


class LRSearch(BaseModel):
    """What :func:`choose_base_lr` did, kept in ``FitResult.lr_search`` by ``fit(lr="auto")``.

    Attributes:
        lr: the chosen base LR, at the base batch ``initial_batch_size``.
        lr_range: ``(low, high)`` the candidates spanned.
        candidates: the LRs of rung 0, ascending.
        rungs: examples each surviving trial had trained on at the end of each rung.
        survivors: trials in each rung.
        samples: examples the study trained on, all trials together (its compute).
        run_samples: examples of the run the LR is for.
        fraction: ``samples / run_samples``.
        max_fraction: the most the study was allowed (``fraction`` never exceeds it).
        val_examples: examples the trials were scored on.
        held_out: True when those were held out of the training data (no ``val_data``
            given); the trials then trained on the rest.
        refined: True when the parabola step moved the LR off the grid.
        trials: one row per candidate (``COMPLETE``: reached the last rung; ``PRUNED``:
            dropped at a rung or diverged, with the reason).
        wall_time_s: seconds the study took.
        study: the in-memory ``optuna.Study`` (not serialised).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    lr: float
    lr_range: tuple[float, float]
    candidates: list[float]
    rungs: list[int]
    survivors: list[int]
    samples: int
    run_samples: int
    fraction: float
    max_fraction: float
    val_examples: int
    held_out: bool
    refined: bool = False
    trials: list[TrialRow] = Field(default_factory=list)
    wall_time_s: float = 0.0
    study: Any = Field(default=None, exclude=True)

    def table(self) -> str:
        """The trials as a text table (LR, state, score, examples, steps, why it stopped)."""
        best = min((r.value for r in self.trials if r.value is not None), default=None)
        return TuneResult(study=self.study, trials=self.trials, best_value=best).table()


def resumed_search(checkpoint_dir: str | Path | None) -> LRSearch | None:
    """The study an interrupted ``fit(lr="auto")`` already ran, from its checkpoint (so a
    resumed run trains at the same LR without a second study); None if there is none."""

    ckpt = load_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    found = ckpt["result"].get("lr_search") if ckpt is not None else None
    return LRSearch(**found) if found else None


def _is_adaptive(optimizer: Any) -> bool:
    """Whether ``optimizer`` (a class, factory or built optimizer) is Adam-like."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return isinstance(optimizer, _ADAPTIVE)
    with torch.random.fork_rng(devices=[]):  # building the probe layer draws its init
        return isinstance(build_optimizer(optimizer, nn.Linear(1, 1).parameters(), 1e-3), _ADAPTIVE)


def _lower_neighbour_second(ranked: list, candidates: list[float]) -> list:
    """``ranked`` (best first) with the best trial's lower grid neighbour moved to second
    place when it is among them and finite: an Adam-like study's finalists (module docstring,
    item 5)."""
    i = candidates.index(ranked[0].lr)
    lower = next((t for t in ranked[1:] if i > 0 and t.lr == candidates[i - 1]), None)
    if lower is None or not math.isfinite(lower.score):
        return ranked
    return [ranked[0], lower, *(t for t in ranked[1:] if t is not lower)]


def default_lr_range(optimizer: Any) -> tuple[float, float]:
    """Where to look for the base LR when none is given: :data:`ADAPTIVE_RANGE` (1e-4 to
    1e-2) for Adam-like optimizers, :data:`SGD_RANGE` (1e-3 to 1) for the rest.

    Args:
        optimizer: a class, a factory ``f(params, lr)`` or a built optimizer, as ``fit`` takes.
    """
    return ADAPTIVE_RANGE if _is_adaptive(optimizer) else SGD_RANGE


def plan_rungs(examples: int, final: int, n_candidates: int, min_rung: int) -> tuple[list[int], list[int]] | None:
    """The successive-halving schedule: as many candidates as ``examples`` examples allow.

    The last rung trains its survivors to ``final`` examples. With one rung, every candidate
    trains to ``final`` (as many as fit, at least 2). With ``K`` earlier rungs and a schedule
    ``(growth, keep)`` of :data:`SCHEDULES`, rung ``k`` trains to ``final / growth**(K - k)``
    examples and keeps the best ``1/keep`` of its trials (2 go into the last rung); survivors
    continue where they stopped, so the study costs ``n0 * r0 + sum_k n_k * (r_k - r_(k-1))``.
    The plan with the most candidates wins (the first found among equals: fewer rungs, longer
    ones); no rung 0 shorter than ``min_rung``.

    Args:
        examples: examples the whole study may train on.
        final: examples each trial of the last rung trains on.
        n_candidates: the most candidates wanted.
        min_rung: the fewest examples a rung-0 trial may get.

    Returns:
        ``(rungs, survivors)``: examples per trial at the end of each rung and trials per rung
        (``survivors[0]`` is the number of candidates), or None when fewer than 2 candidates
        fit (or ``final < min_rung``).
    """
    n0 = min(n_candidates, examples // final)
    best = ([final], [n0]) if n0 >= 2 and final >= min_rung else None
    for k in range(1, 8):
        for growth, keep in SCHEDULES:
            rungs = [final // growth ** (k - j) for j in range(k + 1)]
            if rungs[0] < min_rung:
                continue
            later = [2 * keep ** (k - j) for j in range(1, k + 1)]  # trials in rungs 1..k
            fixed = sum(n * (rungs[j + 1] - rungs[j]) for j, n in enumerate(later))
            n0 = min(n_candidates, (examples - fixed) // rungs[0]) if examples > fixed else 0
            if n0 > later[0] and (best is None or n0 > best[1][0]):
                best = (rungs, [n0, *later])
    return best


def parabola_vertex(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The ``x`` of the lowest point of the parabola through three points, or None when
    they do not curve upwards (the middle point is not below the chord)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    denom = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if denom >= 0 or not all(map(math.isfinite, (*xs, *ys))):
        return None
    numer = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    return x1 - 0.5 * numer / denom


class _Segment(Callback):
    """Evaluates one trial at given numbers of examples, remembers the losses, and ends the
    segment at the first step that reaches ``stop_at`` examples (the run's own stopping rules
    stay in force, so its policy sees the run's length)."""

    def __init__(self, model: nn.Module, val: BatchSource, loss_fn: Callable, marks: list[int],
                 device: Any, losses: list[float], stop_at: int) -> None:
        self.model, self.val, self.loss_fn, self.device = model, val, loss_fn, device
        self.marks, self.losses, self.stop_at = list(marks), losses, stop_at
        self.samples = self.steps = self.batch_size = 0

    def on_step_end(self, record) -> None:
        self.samples, self.steps, self.batch_size = record.samples, record.step, record.batch_size
        while self.marks and record.samples >= self.marks[0]:
            self.marks.pop(0)
            loss = evaluate(self.model, self.val, self.loss_fn, device=self.device)["val_loss"]
            self.losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"val_loss={loss} after {record.samples} examples")
        if record.samples >= self.stop_at:
            raise StopTraining(f"end of the rung at {self.stop_at} examples")


def choose_base_lr(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    val_data: Any = None,
    val_loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: Any = torch.optim.SGD,
    epochs: float | None = None,
    max_steps: int | None = None,
    max_samples: int | None = None,
    config: FitConfig | dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    lr_range: tuple[float, float] | None = None,
    fraction: float = DEFAULT_FRACTION,
) -> LRSearch:
    """Choose the base LR of a run by successive halving on short trials (module docstring).

    Takes what ``autobatch.fit`` has when called with ``lr="auto"``; the run's length
    (``epochs``, ``max_steps``, ``max_samples``, the first reached wins) sets the study's
    run_examples, ``fraction`` of the run's examples. With only ``max_steps``, the run is taken to
    be ``max_steps * initial_batch_size`` examples (the fewest it can process).

    The model is trained in place by each trial and put back to the weights it came with
    before returning; the global RNGs (torch, CUDA, numpy, Python) are left as found.

    Args:
        model: the model to train (its current weights are every trial's start).
        data: the training data, in any form ``fit`` takes.
        loss_fn: ``loss_fn(output, target)`` -> scalar, **mean-reduced** over the batch.
        val_data: data to score trials on; None holds out :data:`VAL_FRACTION` of ``data``
            (a seeded random 10%, by ``config``'s ``seed``) and trains trials on the rest.
        val_loss_fn: the loss that scores trials on ``val_data`` (None: ``loss_fn``; a
            held-out share of ``data`` is always scored with ``loss_fn``).
        optimizer: as for ``fit``: a class, a factory ``f(params, lr)`` or a built optimizer
            (copied per trial with every param group's settings; the trial's LR is the first
            group's and the others keep their ratio to it, :mod:`autobatch.optimizers`).
        epochs, max_steps, max_samples: the run's stopping rules, as given to ``fit``.
        config: the run's settings (FitConfig or dict); trials use them with the progress
            bar, evaluation and checkpoint cadence off.
        device: as for ``fit``.
        precision: as for ``fit``.
        lr_range: ``(low, high)`` for the candidates; None: :func:`default_lr_range`.
        fraction: the most the study may train on, as a share of the run's examples
            (0 < fraction <= 1; the default 0.5 keeps study + run within 1.5 runs).

    Returns:
        An :class:`LRSearch`; ``.lr`` is the base LR to train with.

    Raises:
        ValueError: for bad arguments (all named at once), a run_examples too short for a study
            (fewer than 2 candidates would get :data:`MIN_RUNG_STEPS` steps), or when every
            candidate diverged.
    """
    started = time.perf_counter()
    cfg = FitConfig.from_any(config)
    source = as_batch_source(data)
    n, b0 = len(source), cfg.batch.initial_batch_size
    problems = []
    if epochs is None and max_steps is None and max_samples is None:
        problems.append("lr='auto' needs the run's length to size its study: give epochs, max_steps or max_samples")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        problems.append(f"fraction must be in (0, 1] (got fraction={fraction!r}); 0.5 keeps study + run within 1.5 runs")
    low, high = lr_range if lr_range is not None else default_lr_range(optimizer)
    if not (0 < low < high and math.isfinite(high)):
        problems.append(f"lr_range must be (low, high) with 0 < low < high (got lr_range={lr_range!r})")
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        problems.append("lr='auto' runs its study in one process; under torchrun, find the LR first "
                        "(autobatch.tune_lr) and pass it as lr")
    if problems:
        raise ValueError("; ".join(problems))
    run_examples = RunLength(epochs, None, max_samples).examples(n)
    if max_steps is not None:
        run_examples = min(run_examples, max_steps * b0) if run_examples is not None else max_steps * b0

    train_source, val, held_out = _split(source, val_data, cfg.data.seed, b0)
    n_candidates = 1 + math.floor(math.log(high / low) / math.log(GRID_RATIO) + 1e-9)
    allowed = int(_PLAN_MARGIN * fraction * run_examples)
    min_rung = MIN_RUNG_STEPS * b0
    # The last rung at 1/8 of the run; a run too short for 2 candidates there compares 3
    # candidates on a third of the study's examples each.
    plan = plan_rungs(allowed, max(min_rung, math.ceil(FINAL_FRACTION * run_examples)), n_candidates, min_rung) \
        or plan_rungs(allowed, allowed // 3, n_candidates, min_rung)
    if plan is None:
        raise ValueError(
            f"the run is too short for lr='auto': its study may train on {fraction:g} x {run_examples} "
            f"examples, less than 2 candidates x {MIN_RUNG_STEPS} steps x initial_batch_size={b0}; "
            "pass an lr, or train longer"
        )
    rungs, survivors = plan
    n0 = survivors[0]
    candidates = [low * (high / low) ** (i / (n0 - 1)) for i in range(n0)]
    factory = _factory(optimizer, model)
    adaptive = _is_adaptive(optimizer)
    limits = {"epochs": epochs, "max_steps": max_steps, "max_samples": max_samples}
    trial_cfg = FitConfig.from_any(cfg, progress=False, eval_every=None, checkpoint_every=None)

    rng = capture_rng()
    initial = copy.deepcopy(model.state_dict())
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="autobatch-lr-") as tmp:
            study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="minimize",
                                        study_name="autobatch-lr-auto")
            trials = []
            for i, lr in enumerate(candidates):
                study.enqueue_trial({"lr": lr})
                trial = study.ask({"lr": optuna.distributions.FloatDistribution(low, high, log=True)})
                trials.append(_Trial(trial, lr, Path(tmp) / f"t{i}"))
            alive = trials
            for k, rung in enumerate(rungs):
                for t in alive:
                    _run_segment(t, model, initial, train_source, val, loss_fn, factory, rung, limits, trial_cfg, device,
                                 precision, val_loss_fn=None if held_out else val_loss_fn)
                by_score = sorted(alive, key=lambda t: t.score)
                cut = survivors[k + 1] if k + 1 < len(rungs) else len(by_score)
                ranked = _lower_neighbour_second(by_score, candidates) if cut == 2 and adaptive else by_score
                for t in ranked[cut:]:
                    t.reason = t.reason or (f"dropped at rung {k + 1}/{len(rungs)} ({rung} examples): ranked "
                                            f"{by_score.index(t) + 1} of {len(by_score)}, score {t.score:.4g}")
                alive = [t for t in ranked[:cut] if math.isfinite(t.score)]
                if not alive:
                    break
            for t in trials:
                t.record(study, complete=any(t is a for a in alive))
    finally:
        optuna.logging.set_verbosity(level)
        model.load_state_dict(initial)
        restore_rng(rng)
    if not alive:
        raise ValueError(
            f"every candidate LR in lr_range=({low:g}, {high:g}) diverged or failed in the study "
            f"({n0} candidates); pass a lower lr_range, or an lr"
        )
    lr, refined = _pick(alive, candidates, adaptive)
    spent = sum(t.samples for t in trials)
    summary = _summarise(study)
    return LRSearch(
        lr=lr, lr_range=(low, high), candidates=candidates, rungs=rungs, survivors=survivors,
        samples=spent, run_samples=run_examples, fraction=spent / run_examples, max_fraction=fraction,
        val_examples=len(val), held_out=held_out, refined=refined, trials=summary.trials,
        wall_time_s=time.perf_counter() - started, study=study,
    )


@dataclasses.dataclass
class _Trial:
    """One candidate LR across the rungs: its Optuna trial, checkpoint folder and losses."""

    trial: optuna.Trial
    lr: float
    folder: Path
    losses: list[float] = dataclasses.field(default_factory=list)
    score: float = math.inf  # the last rung's score; inf until scored, or once diverged
    samples: int = 0
    steps: int = 0
    batch_size: int = 0
    reason: str | None = None
    wall_time_s: float = 0.0

    def record(self, study: optuna.Study, complete: bool) -> None:
        """Tell the study how the trial ended (its cost and reason as user attributes)."""
        for key, value in (("samples", self.samples), ("steps", self.steps), ("final_batch_size", self.batch_size),
                           ("reason", self.reason), ("wall_time_s", round(self.wall_time_s, 3))):
            self.trial.set_user_attr(key, value)
        if complete:
            study.tell(self.trial, self.score)
        else:
            study.tell(self.trial, state=optuna.trial.TrialState.PRUNED)


def _run_segment(t: _Trial, model, initial, train_data, val, loss_fn, factory, rung: int, limits: dict[str, Any],
                 cfg: FitConfig, device, precision, val_loss_fn=None) -> None:
    """Train trial ``t`` on to ``rung`` examples (from the initial weights, or from its
    checkpoint) and score it on its evaluations at 7/8 of the rung and at its end. ``limits``
    are the run's stopping rules (``epochs``, ``max_steps``, ``max_samples``): the trial's fit
    has them, so that its policy sees the run's length, and a callback ends it at the rung."""
    marks = [math.ceil(rung * 7 / 8), rung]
    seen = len(t.losses)
    segment = _Segment(model, val, val_loss_fn or loss_fn, [m for m in marks if m > t.samples], device, t.losses, rung)
    if not t.samples:
        model.load_state_dict(initial)
    start = time.perf_counter()
    try:
        train(model, train_data, loss_fn=loss_fn, optimizer=factory, lr=t.lr, **limits, config=cfg,
              callbacks=[segment], device=device, checkpoint_dir=t.folder, resume=True, precision=precision)
    except FloatingPointError as err:
        t.score, t.reason = math.inf, f"diverged: {err}"
        return
    finally:
        t.wall_time_s += time.perf_counter() - start
        if segment.steps:
            t.samples, t.steps, t.batch_size = segment.samples, segment.steps, segment.batch_size
    t.score = score("tail", t.losses[seen:], n_evals=8)
    t.trial.report(t.score, step=rung)


def _pick(alive: list[_Trial], candidates: list[float], adaptive: bool = False) -> tuple[float, bool]:
    """The LR the study settles on, and whether it lies off the grid.

    Two finalists that are grid neighbours: their geometric mean. Their ranking after 1/8 of
    the run is unreliable in both directions (measured: the full run's best LR looked worse
    than a smaller one on MNIST-1D and than a larger one on charlm), and the midpoint is
    within half a grid step of either. Three or more (a single rung): the best, moved to the
    vertex of the parabola through it and its two neighbours by at most half a grid step.
    Otherwise the best.

    ``adaptive`` (an Adam-like optimizer): the best, lowered by half a grid step (the
    geometric mean of it and its lower grid neighbour; the lowest candidate stays), since
    short trials overrate a larger Adam LR (module docstring, item 5).
    """
    best = min(alive, key=lambda t: t.score)
    i = candidates.index(best.lr)
    by_lr = {t.lr: t.score for t in alive}
    if adaptive:  # half a grid step below the winner, within the range
        if i == 0:
            return best.lr, False
        return math.sqrt(candidates[i] * candidates[i - 1]), True
    if len(alive) == 2:
        j = candidates.index(next(t.lr for t in alive if t is not best))
        if abs(i - j) == 1:
            return math.sqrt(candidates[i] * candidates[j]), True
        return best.lr, False
    if 0 < i < len(candidates) - 1 and candidates[i - 1] in by_lr and candidates[i + 1] in by_lr:
        xs = [math.log(candidates[j]) for j in (i - 1, i, i + 1)]
        vertex = parabola_vertex(xs, [by_lr[candidates[j]] for j in (i - 1, i, i + 1)])
        if vertex is not None:
            half = (xs[2] - xs[0]) / 4  # half a grid step
            x = min(max(vertex, xs[1] - half), xs[1] + half)
            return math.exp(x), x != xs[1]
    return best.lr, False


def _split(source: BatchSource, val_data: Any, seed: int, b0: int) -> tuple[BatchSource, BatchSource, bool]:
    """(train, val, held_out): the user's validation data, or a seeded 10% of ``source``."""
    if val_data is not None:
        return source, as_batch_source(val_data, name="val_data"), False
    n = len(source)
    n_val = max(1, round(VAL_FRACTION * n))
    if n - n_val < b0:
        raise ValueError(
            f"lr='auto' without val_data holds out {n_val} of the {n} training examples to score "
            f"trials, leaving fewer than initial_batch_size={b0}; pass val_data or more data"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _subset(source, order[n_val:]), _subset(source, order[:n_val]), True


def _subset(source: BatchSource, indices: torch.Tensor) -> BatchSource:
    ds = source.dataset
    if isinstance(ds, torch.utils.data.TensorDataset):
        return BatchSource(torch.utils.data.TensorDataset(*(t[indices] for t in ds.tensors)), source.collate_fn)
    return BatchSource(torch.utils.data.Subset(ds, indices.tolist()), source.collate_fn)


def _factory(optimizer: Any, model: nn.Module) -> Any:
    """The optimizer spec for trials: a built optimizer is copied for each trial
    (:func:`~autobatch.optimizers.copy_for`: the same class and every param group's settings,
    the trial's LR as the spec sets it), since it is bound to the state of one run; the run
    itself then trains with the instance. A factory gets the trainable parameters in
    ``model.parameters()`` order: the model's own, or the memory probe's stand-ins for them."""
    if isinstance(optimizer, torch.optim.Optimizer):
        trainable = [p for p in model.parameters() if p.requires_grad]
        return lambda params, lr: copy_for(optimizer, dict(zip(trainable, params, strict=True)), lr)
    return optimizer

