"""What the language-model pretraining benchmarks share (``lm_pretrain``, ``gpu_lm``, issue 28).

- The corpus (:func:`load_corpus`): Python standard-library sources and docs, the ``.py`` files
  under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``, test folders and the
  ``encodings`` code tables left out: :data:`SKIP_DIRS`) in sorted order of their paths, whole
  files taken until the corpus holds the requested characters. Characters outside printable
  ASCII and newline become ``?`` (:data:`VOCAB`, 96 symbols). The split is by file: every
  ``held_out_every``-th file of that order is held out, the rest is the training text. The
  same on every run with the same interpreter.
- Examples (:class:`LMData`): the training text cut into windows of ``context + 1`` characters
  overlapping by one (each character a target once); one pass over them (one epoch, shuffled
  by the run's seed), so no window is ever seen twice. The held-out loss is the mean over
  evenly spaced held-out windows.
- The model: :class:`~autobatch.problems.charlm.CharTransformer` (:class:`ModelSpec`), seeded.
- The user's schedule (:class:`Schedule`): warm-up then cosine to ``floor`` (10%) of the peak,
  or warm-up-stable-decay (WSD: the peak until the last ``decay`` of the run, then linear to
  ``floor``), as a ``LambdaLR`` factor on ``fit``'s scheduler clock, one tick per ``B0``
  examples, so every batch size sees the same schedule in examples (tokens).
- :func:`run`: one arm trained with ``autobatch.fit`` (AdamW), evaluated at fixed fractions of
  its example budget (evaluation time left out of its wall time), returning steps, tokens,
  wall time, the eval curve, and B and the LR over the run.
- :func:`reach`: steps, tokens and wall time at which an eval curve first reaches a loss,
  interpolated between evaluations.
"""

from __future__ import annotations

import functools
import math
import os
import re
import statistics
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import autobatch
from autobatch.policies.base import BatchSizePolicy, PolicyContext
from autobatch.problems.charlm import CharTransformer
from autobatch.train.callbacks import Callback

__all__ = ["SKIP_DIRS", "VOCAB", "Corpus", "FractionRamp", "LMData", "ModelSpec", "Schedule", "load_corpus",
           "mean_curve", "reach", "run", "sequence_loss", "stdlib_files", "summarise_arm"]

VOCAB = "\n" + "".join(map(chr, range(32, 127)))  # newline and printable ASCII: 96 symbols
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings"})
_NOT_IN_VOCAB = re.compile(r"[^\n -~]")


# -- the corpus --------------------------------------------------------------------------------------
def stdlib_files(root: str | None = None) -> list[str]:
    """The standard library's ``.py`` files (paths relative to ``root``, ``/``-separated) in
    sorted order, without the folders of :data:`SKIP_DIRS`."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        rel = os.path.relpath(dirpath, root)
        out += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in filenames
                if name.endswith(".py")]
    return sorted(out)


def clean(text: str) -> str:
    """Characters outside :data:`VOCAB` become ``?``."""
    return _NOT_IN_VOCAB.sub("?", text)


@dataclass(frozen=True)
class Corpus:
    """The text, split by file: ``train`` and ``held_out`` (each the files' texts joined by
    newlines) and the files of each."""

    train: str
    held_out: str
    train_files: tuple[str, ...]
    held_out_files: tuple[str, ...]

    @property
    def chars(self) -> int:
        return len(self.train) + len(self.held_out)


@functools.lru_cache(maxsize=4)
def load_corpus(chars: int, held_out_every: int = 20) -> Corpus:
    """The first whole files of :func:`stdlib_files` holding at least ``chars`` characters (all
    of them if fewer), every ``held_out_every``-th of them held out.

    Raises:
        ValueError: for ``chars < 1`` or ``held_out_every < 2``, or a library with no
            sources to read.
    """
    if chars < 1 or held_out_every < 2:
        raise ValueError(f"need chars >= 1 and held_out_every >= 2 (got chars={chars}, held_out_every={held_out_every})")
    root = sysconfig.get_paths()["stdlib"]
    parts: tuple[list[str], list[str]] = ([], [])
    names: tuple[list[str], list[str]] = ([], [])
    total = 0
    for k, name in enumerate(stdlib_files(root)):
        if total >= chars:
            break
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            text = clean(f.read())
        side = int(k % held_out_every == held_out_every - 1)
        parts[side].append(text)
        names[side].append(name)
        total += len(text)
    if not parts[0] or not parts[1]:
        raise ValueError(f"the standard library under {root} gave too few source files for a training and a "
                         f"held-out set (read {total:,} characters); is it installed without its .py sources?")
    return Corpus("\n".join(parts[0]), "\n".join(parts[1]), tuple(names[0]), tuple(names[1]))


def encode(text: str) -> torch.Tensor:
    """Character ids (int64) of a text of :data:`VOCAB` characters (newline 0, space 1, ...)."""
    raw = torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()
    return torch.where(raw == 10, 0, raw - 31)


def windows(text: str, context: int) -> torch.Tensor:
    """``(count, context + 1)`` int64 windows of ``text``, overlapping by one character."""
    ids = encode(text)
    count = (ids.numel() - 1) // context
    return ids[: count * context + 1].unfold(0, context + 1, context).contiguous()


@dataclass(frozen=True)
class LMData:
    """The examples of one corpus at one context: ``train`` inputs and targets (one window
    each), and the ``held`` windows the loss is evaluated on."""

    chars: int
    context: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    held_x: torch.Tensor
    held_y: torch.Tensor
    corpus: Corpus

    @property
    def examples(self) -> int:
        return self.train_x.shape[0]

    def describe(self) -> dict[str, Any]:
        c = self.corpus
        return {"corpus_chars": c.chars, "train_chars": len(c.train), "held_out_chars": len(c.held_out),
                "train_files": len(c.train_files), "held_out_files": len(c.held_out_files),
                "first_file": min(c.train_files + c.held_out_files), "last_file": max(c.train_files + c.held_out_files),
                "context": self.context, "train_windows": self.examples, "eval_windows": self.held_x.shape[0],
                "train_tokens": self.examples * self.context}


@functools.lru_cache(maxsize=2)
def lm_data(chars: int, context: int, eval_windows: int = 1024, held_out_every: int = 20) -> LMData:
    """:class:`LMData` for a corpus of ``chars`` characters; the held-out loss is taken over
    ``eval_windows`` held-out windows evenly spaced over the held-out text (all if fewer)."""
    corpus = load_corpus(chars, held_out_every)
    train, held = windows(corpus.train, context), windows(corpus.held_out, context)
    if held.shape[0] > eval_windows:
        held = held[torch.linspace(0, held.shape[0] - 1, eval_windows).round().long()]
    return LMData(chars, context, train[:, :-1].contiguous(), train[:, 1:].contiguous(), held[:, :-1].contiguous(),
                  held[:, 1:].contiguous(), corpus)


# -- the model ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A :class:`CharTransformer`'s shape (its context is the data's)."""

    d_model: int = 64
    heads: int = 4
    layers: int = 3

    def build(self, context: int, seed: int) -> CharTransformer:
        """The model, initialised from ``seed`` (the global RNG left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CharTransformer(len(VOCAB), context, self.d_model, self.heads, self.layers)

    def parameters(self, context: int) -> int:
        return sum(p.numel() for p in self.build(context, 0).parameters())


def sequence_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of every window (nats per character)."""
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))


# -- the user's schedule -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """The LR factor at tick ``t`` of ``total`` (a ``LambdaLR`` ``lr_lambda``): linear warm-up
    over the first ``warmup`` of the ticks (from ``1/w``, so the first step learns), then

    - ``"cosine"``: ``floor + (1 - floor) (1 + cos(pi p)) / 2``, ``p`` the fraction of the
      ticks after the warm-up;
    - ``"wsd"``: 1 until the last ``decay`` of the ticks, then linear to ``floor``;

    and ``floor`` from ``total`` on."""

    kind: str
    total: int
    warmup: float = 0.05
    decay: float = 0.2
    floor: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "wsd") or self.total < 1:
            raise ValueError(f"Schedule needs kind 'cosine' or 'wsd' and total >= 1 (got {self.kind!r}, {self.total})")

    def __call__(self, tick: int) -> float:
        w = max(1, round(self.warmup * self.total))
        if tick < w:
            return (tick + 1) / w
        if self.kind == "cosine":
            p = min(1.0, (tick - w) / max(1, self.total - w))
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p))
        start = max(w, round((1 - self.decay) * self.total))
        q = min(1.0, max(0.0, (tick - start) / max(1, self.total - start)))
        return 1.0 - (1 - self.floor) * q


# -- a fixed ramp ------------------------------------------------------------------------------------
class FractionRamp(BatchSizePolicy):
    """Batch warm-up as Megatron's ``rampup-batch-size`` and OLMo's batch warm-up do it: ``B0 x
    factor^k`` once ``k`` of ``fractions`` of the run (``PolicyContext.progress``, in examples)
    have passed, whatever the noise scale. Meant with ``lr_scaling="none"``: the schedule's LR
    as written."""

    def __init__(self, fractions: Sequence[float] = (0.25, 0.5), factor: float = 2.0) -> None:
        self.fractions, self.factor = tuple(fractions), factor

    def propose(self, ctx: PolicyContext) -> int:
        done = ctx.progress if math.isfinite(ctx.progress) else 0.0
        k = sum(done >= f for f in self.fractions)
        return min(ctx.max_batch_size, round(ctx.base_batch_size * self.factor**k))


# -- one run -----------------------------------------------------------------------------------------
@torch.inference_mode()
def held_out_loss(model: nn.Module, data: LMData, device: torch.device, batch: int = 256,
                  precision: str = "fp32") -> float:
    """The mean held-out loss (nats per character); the model's train/eval mode restored."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    dtype = torch.bfloat16 if precision == "bf16" else None
    for i in range(0, data.held_x.shape[0], batch):
        x, y = data.held_x[i:i + batch].to(device), data.held_y[i:i + batch].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        total += sequence_loss(out, y).item() * y.numel()
        count += y.numel()
    model.train(was)
    return total / count


class _Recorder(Callback):
    """Evaluates at the first step reaching each of ``thresholds`` (examples) and records every
    step's B and LR; wall time excludes evaluation."""

    def __init__(self, model: nn.Module, data: LMData, thresholds: list[int], device: torch.device,
                 precision: str) -> None:
        self.model, self.data, self.device, self.precision = model, data, device, precision
        self.thresholds, self.eval_s = thresholds, 0.0
        self.curve: list[dict[str, Any]] = []
        self.steps: list[tuple[int, int, int, int, float, float, float]] = []

    def evaluate(self, step: int, samples: int, wall_s: float) -> None:
        t0 = time.perf_counter()
        loss = held_out_loss(self.model, self.data, self.device, precision=self.precision)
        self.curve.append({"step": step, "samples": samples, "tokens": samples * self.data.context,
                           "wall_s": round(wall_s - self.eval_s, 3), "loss": loss if math.isfinite(loss) else None})
        self.eval_s += time.perf_counter() - t0

    def on_step_end(self, record: Any) -> None:
        self.steps.append((record.step, record.samples, record.examples, record.batch_size, record.lr, record.base_lr,
                           record.noise_scale))
        if self.thresholds and record.samples >= self.thresholds[0]:
            while self.thresholds and record.samples >= self.thresholds[0]:
                self.thresholds.pop(0)
            self.evaluate(record.step, record.samples, record.wall_time_s)


def _trace(steps: list[tuple], context: int, points: int = 200) -> list[list[float]]:
    """``[step, tokens, B, lr, base_lr, B_simple or None]`` at every change of B and
    about every 1/``points`` of the examples: enough to plot B and the LR over the run."""
    if not steps:
        return []
    every = max(1, steps[-1][1] // points)
    out, last_mark, last_b = [], -1, None
    for i, (step, samples, _, batch, lr, base_lr, noise) in enumerate(steps):
        mark = samples // every
        if batch != last_b or mark != last_mark or i == len(steps) - 1:
            out.append([step, samples * context, batch, round(lr, 8), round(base_lr, 8),
                        round(noise, 2) if math.isfinite(noise) else None])
            last_mark, last_b = mark, batch
    return out


def run(data: LMData, spec: ModelSpec, *, b0: int, lr: float, seed: int, schedule: str,
        overrides: dict[str, Any] | None = None, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), max_examples: int | None = None,
        device: str | torch.device = "cpu", precision: str = "fp32") -> dict[str, Any]:
    """One arm: ``autobatch.fit`` from ``B0 = b0`` at peak LR ``lr`` (AdamW with ``weight_decay``
    and ``betas``) under ``schedule`` (``"cosine"`` or ``"wsd"``, :class:`Schedule` over the
    budget), one pass over ``max_examples`` training windows (default: all of them),
    ``overrides`` passed to ``fit`` (the policy and its settings), model and data order from
    ``seed``. The held-out loss is evaluated at the first step reaching each of ``fractions`` of
    the budget and at the end.

    Returns:
        ``final_loss``, ``steps``, ``samples``, ``tokens``, ``wall_s`` (training only) at the
        end; ``curve`` (the evaluations: step, samples, tokens, wall_s, loss), ``trace`` (B and
        LR over the run, :func:`_trace`), ``max_batch_size``, ``eval_s`` and ``total_s``.
    """
    device = torch.device(device)
    n = data.examples if max_examples is None else min(max_examples, data.examples)
    model = spec.build(data.context, seed).to(device)
    thresholds = sorted({max(1, math.ceil(f * n)) for f in fractions})
    rec = _Recorder(model, data, thresholds, device, precision)
    sched = Schedule(schedule, total=max(1, n // b0))
    stop = {"epochs": 1.0} if n == data.examples else {"max_samples": n}
    t0 = time.perf_counter()
    diverged = None
    try:
        r = autobatch.fit(
            model, (data.train_x, data.train_y), loss_fn=sequence_loss, lr=lr,
            optimizer=functools.partial(torch.optim.AdamW, weight_decay=weight_decay, betas=betas),
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=sched),
            initial_batch_size=b0, seed=seed, progress=False, callbacks=[rec], device=device, precision=precision,
            **stop, **(overrides or {}))
        steps, samples, skipped = r.steps, r.samples, r.skipped_steps
        if not rec.curve or rec.curve[-1]["step"] != r.steps:
            rec.evaluate(r.steps, r.samples, r.wall_time_s)
    except FloatingPointError as err:  # fit stops after max_nonfinite_steps non-finite steps in a row
        diverged = str(err).splitlines()[0]
        steps, samples, skipped = (rec.steps[-1][0], rec.steps[-1][1], None) if rec.steps else (0, 0, None)
    total = time.perf_counter() - t0
    end = rec.curve[-1] if rec.curve and diverged is None else {"loss": None, "wall_s": None}
    return {
        "b0": b0, "lr": lr, "seed": seed, "schedule": schedule,
        "final_loss": end["loss"], "steps": steps, "samples": samples, "tokens": samples * data.context,
        "wall_s": end["wall_s"], "eval_s": round(rec.eval_s, 2), "total_s": round(total, 2),
        "max_batch_size": max((s[2] for s in rec.steps), default=0), "skipped_steps": skipped, "diverged": diverged,
        "curve": rec.curve, "trace": _trace(rec.steps, data.context),
    }


# -- the maths of the summaries ----------------------------------------------------------------------
REACH_KEYS = ("step", "tokens", "wall_s")


def reach(curve: Sequence[dict[str, Any]], target: float, keys: Sequence[str] = REACH_KEYS) -> dict[str, float] | None:
    """The ``keys`` (step, tokens, wall time) at which the eval ``curve`` first falls to
    ``target``, each linearly interpolated in loss between the last finite evaluation above it
    and the first at or below it; the first evaluation's own figures if that one is already
    at or below; None if no evaluation is. An evaluation whose ``loss`` is None (not finite)
    is skipped."""
    prev = None
    for c in curve:
        if c["loss"] is None:
            continue
        if c["loss"] <= target:
            if prev is None:
                return {k: float(c[k]) for k in keys}
            w = (prev["loss"] - target) / (prev["loss"] - c["loss"])
            return {k: prev[k] + w * (c[k] - prev[k]) for k in keys}
        prev = c
    return None


def mean_curve(curves: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, float]] | None:
    """The seeds' eval curves averaged point by point (loss, step, tokens, wall time): the
    runs of one arm evaluate at the same fractions of the examples, so the k-th points belong
    together. None when the curves differ in length or hold a non-finite loss (a diverged run)."""
    if not curves or len({len(c) for c in curves}) != 1 or any(p["loss"] is None for c in curves for p in c):
        return None
    return [{k: statistics.mean(c[i][k] for c in curves) for k in ("loss", *REACH_KEYS)} for i in range(len(curves[0]))]


def summarise_arm(rows: Sequence[dict[str, Any]], target: float, reference: dict[str, float]) -> dict[str, Any]:
    """One arm's runs (one per seed) against the target loss and the reference's figures (the
    best fixed B's mean steps, tokens and wall time over its runs):

    - the final loss: mean, sd, and the mean over the target minus 1;
    - on the mean eval curve over the seeds (:func:`mean_curve`), the figures at which it first
      reaches the target (:func:`reach`) over the reference's (``mean_ratios``; None if it
      never does); the best fixed B's own mean curve ends exactly at the target (ratios 1);
    - per seed, the same on each seed's curve, and their medians (a seed that never reached
      it counting as infinite: with a seed spread larger than the arms' differences, most
      seeds of every arm, the best fixed B's included, end above the mean of the seeds).
    """
    rows = sorted(rows, key=lambda r: r["seed"])
    mean = mean_curve([r["curve"] for r in rows])
    hit_mean = reach(mean, target) if mean is not None else None
    losses = [r["final_loss"] if r["final_loss"] is not None else math.inf for r in rows]
    per_seed = []
    for r in rows:
        hit = reach(r["curve"], target)
        ratios = None if hit is None else {k: hit[k] / reference[k] for k in REACH_KEYS}
        per_seed.append({"seed": r["seed"], "final_loss": r["final_loss"], "reached": hit, "ratios": ratios})
    final = statistics.mean(losses)
    return {
        "seeds": [r["seed"] for r in rows], "b0": rows[0]["b0"], "lr": rows[0]["lr"],
        "final_loss_mean": final, "final_loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "final_vs_target": final / target - 1,
        "mean_reached": hit_mean,
        "mean_ratios": None if hit_mean is None else {k: hit_mean[k] / reference[k] for k in REACH_KEYS},
        "steps": [r["steps"] for r in rows], "tokens": [r["tokens"] for r in rows], "wall_s": [r["wall_s"] for r in rows],
        "max_batch_size": [r["max_batch_size"] for r in rows],
        "per_seed": per_seed,
        "median_ratios": {k: statistics.median(p["ratios"][k] if p["ratios"] else math.inf for p in per_seed)
                          for k in REACH_KEYS},
        "reached": sum(p["reached"] is not None for p in per_seed),
    }


def spec_dict(spec: ModelSpec, context: int) -> dict[str, Any]:
    """The model's shape and parameter count, for the JSON."""
    return {**asdict(spec), "context": context, "parameters": spec.parameters(context), "vocab": len(VOCAB)}
