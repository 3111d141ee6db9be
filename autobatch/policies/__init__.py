"""Batch-size policies: each proposes the next global batch size from what the loop measured.

The training loop builds a :class:`PolicyContext` every ``decide_every`` optimizer steps and
calls :meth:`BatchSizePolicy.propose`; it also multiplies the LR by
:meth:`BatchSizePolicy.lr_factor` (on top of the LR scaling rule) at every step. All batch
sizes here are *global* (examples per optimizer step, all micro-batches together).

- ``gns``: follow ``noise_multiplier x B_simple``, the smoothed gradient noise scale
  (McCandlish et al. 2018), at most ``max_growth`` times per decision, with hysteresis.
- ``goodput``: maximise measured throughput x statistical efficiency (Pollux, Qiao et al.,
  OSDI 2021).
- ``ramp``: grow the batch where a step schedule would decay the LR (Smith et al. 2017,
  "Don't decay the learning rate, increase the batch size"), and decay the LR only once the
  batch is capped.
- ``fixed``: keep the initial batch; decay the LR at the milestones (the baseline).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from autobatch.noise.estimator import noise_scale_interval

if TYPE_CHECKING:
    from autobatch.config import BatchConfig, LRConfig

__all__ = [
    "POLICIES",
    "BatchSizePolicy",
    "FixedPolicy",
    "GNSPolicy",
    "GoodputPolicy",
    "PolicyContext",
    "RampPolicy",
    "fit_step_time",
    "goodput",
    "make_policy",
    "round_batch_size",
    "statistical_efficiency",
]


@dataclass
class PolicyContext:
    """What a policy may look at when it decides.

    Attributes:
        step: optimizer steps taken so far.
        epoch: epochs completed, fractional (samples seen / training-set size).
        samples: training examples seen so far.
        batch_size: the current global batch size ``B``.
        base_batch_size: ``B0``, the initial batch (where the base LR was tuned).
        min_batch_size: smallest allowed global batch.
        max_batch_size: largest allowed global batch.
        noise_scale: the smoothed ``B_simple`` in examples; NaN if unknown.
        noise_ready: whether the estimator has enough updates to trust ``noise_scale``.
        noise_stderr: standard error of ``noise_scale`` (inf if unknown).
        grad_sq, trace_cov: the estimator's averaged ``|G|^2`` (unfloored) and
            ``tr(Sigma)``; NaN if unknown.
        grad_sq_stderr, trace_cov_stderr: their standard errors (inf if unknown).
        max_micro_batch_size: the largest micro-batch that fits in memory, or None (no
            limit: every step is a single micro-batch).
        step_time_s: median seconds per optimizer step measured at each global batch size
            seen so far (may be empty).
    """

    step: int
    epoch: float
    samples: int
    batch_size: int
    base_batch_size: int
    min_batch_size: int
    max_batch_size: int
    noise_scale: float = math.nan
    noise_ready: bool = False
    noise_stderr: float = math.inf
    grad_sq: float = math.nan
    trace_cov: float = math.nan
    grad_sq_stderr: float = math.inf
    trace_cov_stderr: float = math.inf
    max_micro_batch_size: int | None = None
    step_time_s: dict[int, float] = field(default_factory=dict)


class BatchSizePolicy(ABC):
    """Proposes the next global batch size; may also scale the LR (a schedule)."""

    @abstractmethod
    def propose(self, ctx: PolicyContext) -> int:
        """The global batch size for the next steps (may equal ``ctx.batch_size``)."""

    def lr_factor(self, ctx: PolicyContext) -> float:
        """Extra LR multiplier on top of the scaling rule (1 unless the policy schedules)."""
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        """The policy's mutable state, for checkpoints (the built-in policies have none:
        they decide from the context alone)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    @classmethod
    def from_config(cls, batch: BatchConfig, lr: LRConfig) -> BatchSizePolicy:
        """Build the policy from the config sections (override to read settings)."""
        return cls()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# -- shared maths ------------------------------------------------------------------------------
def round_batch_size(b: float, round_to: int, lo: int, hi: int) -> int:
    """The allowed size nearest ``b``: in ``[lo, hi]``, and a multiple of ``round_to`` when
    above ``round_to`` (sizes up to ``round_to`` are plain integers).

    When no multiple of ``round_to`` lies in ``[lo, hi]`` above ``round_to``, the nearest
    integer in ``[lo, hi]`` is returned. Ties round up.

    Raises:
        ValueError: if ``b`` is not a finite number, ``round_to < 1`` or ``lo > hi``.
    """
    if not math.isfinite(b) or round_to < 1 or not 1 <= lo <= hi:
        raise ValueError(
            "round_batch_size needs a finite size, round_to >= 1 and 1 <= lo <= hi "
            f"(got b={b}, round_to={round_to}, lo={lo}, hi={hi})"
        )
    x = min(max(b, lo), hi)
    nearest_int = min(max(math.floor(x + 0.5), lo), hi)
    if x <= round_to:
        return int(nearest_int)
    m = round_to * math.floor(x / round_to + 0.5)
    if m > hi:
        m -= round_to
    if m < lo:
        m += round_to
    return int(m) if lo <= m <= hi else int(nearest_int)


def _growth_window(current: int, max_growth: float, lo: int, hi: int) -> tuple[int, int]:
    """``[lo, hi]`` narrowed to sizes within a factor ``max_growth`` of ``current``."""
    a = max(lo, math.ceil(current / max_growth - 1e-9))
    b = min(hi, math.floor(current * max_growth + 1e-9))
    return (a, b) if a <= b else (lo, hi)  # current far outside [lo, hi]: just clip


def _keep_unless_material(current: int, proposal: int, hysteresis: float) -> int:
    return proposal if abs(proposal - current) > hysteresis * current else current


def statistical_efficiency(batch_size: float, base_batch_size: int, noise_scale: float) -> float:
    """Progress per example at ``B`` relative to ``B0``: ``(B_noise + B0) / (B_noise + B)``
    (Pollux, Qiao et al. 2021, eq. 4 with ``phi = B_noise``)."""
    return (noise_scale + base_batch_size) / (noise_scale + batch_size)


def _micro_steps(batch_size: Any, max_micro_batch_size: int | None) -> Any:
    if max_micro_batch_size is None:
        return np.ones_like(np.asarray(batch_size, dtype=float))
    return np.ceil(np.asarray(batch_size, dtype=float) / max_micro_batch_size)


def fit_step_time(
    step_time_s: Mapping[int, float], max_micro_batch_size: int | None
) -> tuple[float, float]:
    """Fit ``t(B) = k(B) * t0 + t1 * B`` to measured seconds per optimizer step.

    ``k(B) = ceil(B / max_micro_batch_size)`` is the number of micro-batches (1 without a
    limit): each micro-step costs a fixed ``t0`` seconds plus ``t1`` seconds per example.
    Least squares with ``t0, t1 >= 0``. With a single measured size the split is unknown and
    ``t1 = 0`` is assumed (perfect scaling), which makes a goodput policy explore upwards.

    Returns:
        ``(t0, t1)`` in seconds per micro-step and seconds per example.

    Raises:
        ValueError: if ``step_time_s`` is empty or holds a non-positive size or time.
    """
    if not step_time_s or any(b < 1 or not t > 0 for b, t in step_time_s.items()):
        raise ValueError(
            "fit_step_time needs at least one (batch size >= 1, seconds > 0) measurement "
            f"(got {dict(step_time_s)})"
        )
    sizes = np.array(sorted(step_time_s), dtype=float)
    times = np.array([step_time_s[int(b)] for b in sizes])
    k = _micro_steps(sizes, max_micro_batch_size)
    candidates = [
        (float(np.dot(k, times) / np.dot(k, k)), 0.0),  # t1 = 0
        (0.0, float(np.dot(sizes, times) / np.dot(sizes, sizes))),  # t0 = 0
    ]
    if len(sizes) >= 2:
        design = np.stack([k, sizes], axis=1)
        coef, *_ = np.linalg.lstsq(design, times, rcond=None)
        if coef[0] >= 0 and coef[1] >= 0:
            candidates.append((float(coef[0]), float(coef[1])))
    else:
        return candidates[0]

    def residual(c: tuple[float, float]) -> float:
        return float(np.sum((k * c[0] + sizes * c[1] - times) ** 2))

    return min(candidates, key=residual)


def goodput(
    batch_size: Any,
    base_batch_size: int,
    noise_scale: float,
    t0: float,
    t1: float,
    max_micro_batch_size: int | None = None,
) -> Any:
    """Examples per second at ``B`` times statistical efficiency: ``B / t(B) * eff(B)``.

    ``t(B) = ceil(B / micro) * t0 + t1 * B`` as in :func:`fit_step_time`. Works elementwise
    on arrays of batch sizes.
    """
    b = np.asarray(batch_size, dtype=float)
    t = _micro_steps(b, max_micro_batch_size) * t0 + t1 * b
    return b / t * statistical_efficiency(b, base_batch_size, noise_scale)


def _allowed_sizes(lo: int, hi: int, round_to: int) -> np.ndarray:
    """Every size :func:`round_batch_size` can return in ``[lo, hi]``."""
    small = np.arange(lo, min(hi, round_to) + 1)
    first = max(round_to * 2, math.ceil(lo / round_to) * round_to)
    big = np.arange(first, hi + 1, round_to)
    sizes = np.concatenate([small, big])
    return sizes if sizes.size else np.array([round_batch_size(lo, round_to, lo, hi)])


# -- the policies ------------------------------------------------------------------------------
class GNSPolicy(BatchSizePolicy):
    """Track ``noise_multiplier x B_simple``, the critical batch size's simple proxy.

    Each decision moves towards the target by at most a factor ``max_growth`` (the estimate
    degrades as ``(B_simple/B)^2`` when the batch is far below it, so it is approached in
    steps), keeps the current size unless the change exceeds ``hysteresis`` (relative), clips
    to ``[min, max]`` and rounds with :func:`round_batch_size`. Before the estimator is ready
    the size does not change.

    The estimate is noisy (a single step's relative spread grows as ``B_simple/B``), so the
    policy only moves when the current size lies outside the interval
    :func:`autobatch.noise.estimator.noise_scale_interval` at ``confidence`` standard errors, and then only
    to the interval's nearer edge: B grows when the noise scale is significantly above it and
    shrinks when it is significantly below, instead of following every wobble of the average.
    When the context carries no interval statistics, ``noise_scale +- confidence x
    noise_stderr`` is used.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float = 1.0,
        max_growth: float = 2.0,
        hysteresis: float = 0.05,
        round_to: int = 8,
        confidence: float = 1.0,
    ) -> None:
        if confidence < 0:
            raise ValueError(f"confidence must be >= 0 (got confidence={confidence})")
        self.noise_multiplier = noise_multiplier
        self.max_growth = max_growth
        self.hysteresis = hysteresis
        self.round_to = round_to
        self.confidence = confidence

    @classmethod
    def from_config(cls, batch: BatchConfig, lr: LRConfig) -> GNSPolicy:
        return cls(
            noise_multiplier=batch.noise_multiplier,
            confidence=batch.noise_confidence,
            max_growth=batch.max_growth,
            hysteresis=batch.hysteresis,
            round_to=batch.round_to,
        )

    def propose(self, ctx: PolicyContext) -> int:
        noise = ctx.noise_scale
        if not ctx.noise_ready or not math.isfinite(noise) or noise <= 0.0:
            return ctx.batch_size
        if math.isfinite(ctx.grad_sq) and math.isfinite(ctx.trace_cov):
            low, high = noise_scale_interval(ctx.grad_sq, ctx.trace_cov, ctx.grad_sq_stderr,
                                             ctx.trace_cov_stderr, self.confidence)
        else:
            low, high = noise - self.confidence * ctx.noise_stderr, noise + self.confidence * ctx.noise_stderr
        target = confident_target(ctx.batch_size, low, high)
        if target is None:
            return ctx.batch_size
        lo, hi = _growth_window(ctx.batch_size, self.max_growth, ctx.min_batch_size, ctx.max_batch_size)
        proposal = round_batch_size(self.noise_multiplier * target, self.round_to, lo, hi)
        return _keep_unless_material(ctx.batch_size, proposal, self.hysteresis)


def confident_target(current: float, low: float, high: float) -> float | None:
    """The edge of the interval ``[low, high]`` nearest to ``current``, or None when
    ``current`` lies inside it (no significant evidence to move). NaN bounds never move."""
    if current < low:
        return low
    if current > high:
        return high
    return None


class GoodputPolicy(BatchSizePolicy):
    """Maximise goodput = throughput x statistical efficiency (Pollux, OSDI 2021).

    Throughput comes from the measured step times through the model of
    :func:`fit_step_time`; efficiency is ``(B_noise + B0)/(B_noise + B)``. Every allowed size
    (see :func:`round_batch_size`) within a factor ``max_growth`` of the current one is
    evaluated, the best is taken (the smallest on a tie), and kept only if it differs from the
    current size by more than ``hysteresis``. No change before the noise estimate is ready
    or while no step time is known.
    """

    def __init__(self, *, max_growth: float = 2.0, hysteresis: float = 0.05, round_to: int = 8) -> None:
        self.max_growth = max_growth
        self.hysteresis = hysteresis
        self.round_to = round_to

    @classmethod
    def from_config(cls, batch: BatchConfig, lr: LRConfig) -> GoodputPolicy:
        return cls(max_growth=batch.max_growth, hysteresis=batch.hysteresis, round_to=batch.round_to)

    def propose(self, ctx: PolicyContext) -> int:
        noise = ctx.noise_scale
        if not ctx.noise_ready or not math.isfinite(noise) or noise <= 0.0 or not ctx.step_time_s:
            return ctx.batch_size
        t0, t1 = fit_step_time(ctx.step_time_s, ctx.max_micro_batch_size)
        lo, hi = _growth_window(ctx.batch_size, self.max_growth, ctx.min_batch_size, ctx.max_batch_size)
        sizes = _allowed_sizes(lo, hi, self.round_to)
        values = goodput(sizes, ctx.base_batch_size, noise, t0, t1, ctx.max_micro_batch_size)
        proposal = int(sizes[int(np.argmax(values))])
        return _keep_unless_material(ctx.batch_size, proposal, self.hysteresis)


def _milestones_passed(milestones: list[int], epoch: float) -> int:
    return sum(1 for m in milestones if epoch >= m)


class RampPolicy(BatchSizePolicy):
    """Grow the batch instead of decaying the LR (Smith, Kindermans, Ying & Le 2017).

    At each milestone passed (``epoch >= milestone``) the wanted batch is multiplied by
    ``1/lr_decay``: ``B0 / lr_decay^n`` after ``n`` milestones. Once that exceeds
    ``max_batch_size`` the batch stays at the cap and :meth:`lr_factor` returns the rest of
    the decay, ``B_cap / wanted``, so that ``LR / B`` (the SGD noise) follows the step
    schedule. Use it with ``lr_scaling="none"``: scaling the LR up with ``B`` would undo the
    noise reduction the ramp is for. Decisions follow the epoch alone (no growth limit, no
    hysteresis).
    """

    def __init__(self, *, lr_milestones: list[int], lr_decay: float = 0.1, round_to: int = 8) -> None:
        if not 0.0 < lr_decay < 1.0:
            raise ValueError(
                f"RampPolicy needs 0 < lr_decay < 1 (got lr_decay={lr_decay}); the batch grows "
                "by 1/lr_decay at each milestone"
            )
        self.lr_milestones = list(lr_milestones)
        self.lr_decay = lr_decay
        self.round_to = round_to

    @classmethod
    def from_config(cls, batch: BatchConfig, lr: LRConfig) -> RampPolicy:
        return cls(lr_milestones=lr.lr_milestones, lr_decay=lr.lr_decay, round_to=batch.round_to)

    def _wanted_and_capped(self, ctx: PolicyContext) -> tuple[float, int]:
        n = _milestones_passed(self.lr_milestones, ctx.epoch)
        wanted = ctx.base_batch_size / self.lr_decay**n
        if n == 0:  # B0 is the user's choice: start there, rounded or not
            return wanted, ctx.base_batch_size
        return wanted, round_batch_size(wanted, self.round_to, ctx.min_batch_size, ctx.max_batch_size)

    def propose(self, ctx: PolicyContext) -> int:
        return self._wanted_and_capped(ctx)[1]

    def lr_factor(self, ctx: PolicyContext) -> float:
        wanted, size = self._wanted_and_capped(ctx)
        return 1.0 if wanted <= ctx.max_batch_size else size / wanted


class FixedPolicy(BatchSizePolicy):
    """Keep ``B0``; multiply the LR by ``lr_decay`` at each milestone passed (step decay)."""

    def __init__(self, *, lr_milestones: list[int] | None = None, lr_decay: float = 0.1) -> None:
        self.lr_milestones = list(lr_milestones or [])
        self.lr_decay = lr_decay

    @classmethod
    def from_config(cls, batch: BatchConfig, lr: LRConfig) -> FixedPolicy:
        return cls(lr_milestones=lr.lr_milestones, lr_decay=lr.lr_decay)

    def propose(self, ctx: PolicyContext) -> int:
        return ctx.base_batch_size

    def lr_factor(self, ctx: PolicyContext) -> float:
        return self.lr_decay ** _milestones_passed(self.lr_milestones, ctx.epoch)


POLICIES: dict[str, type[BatchSizePolicy]] = {
    "gns": GNSPolicy,
    "goodput": GoodputPolicy,
    "ramp": RampPolicy,
    "fixed": FixedPolicy,
}


def make_policy(
    name_or_instance: str | BatchSizePolicy, config: BatchConfig, lr_config: LRConfig
) -> BatchSizePolicy:
    """A policy from a name in :data:`POLICIES` (built from the config) or an instance
    (returned as is).

    Raises:
        ValueError: for an unknown name (the message lists the allowed ones).
    """
    if isinstance(name_or_instance, BatchSizePolicy):
        return name_or_instance
    cls = POLICIES.get(name_or_instance) if isinstance(name_or_instance, str) else None
    if cls is None:
        raise ValueError(
            f"unknown policy {name_or_instance!r}; allowed: {', '.join(sorted(POLICIES))} "
            "or a BatchSizePolicy instance"
        )
    return cls.from_config(config, lr_config)
