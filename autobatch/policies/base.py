"""The batch-size policy family: what a policy sees (:class:`PolicyContext`), what it must
do (:class:`BatchSizePolicy`), and the rounding every built-in policy shares.

All batch sizes here are *global* (examples per optimizer step, all micro-batches and ranks
together).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["BatchSizePolicy", "PolicyContext", "round_batch_size"]


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
        noise_scale_stderr: standard error of ``noise_scale`` (inf if unknown).
        grad_sq_mean, trace_cov: the estimator's averaged ``|G|^2`` (unfloored: it may be <= 0;
            ``GradientNoiseScale.grad_sq`` is the floored one) and
            ``tr(Sigma)``; NaN if unknown.
        grad_sq_stderr, trace_cov_stderr: their standard errors (inf if unknown).
        grad_sq_dof, trace_cov_dof: the degrees of freedom of those standard errors (about the
            effective number of draws behind them; inf if unknown), which widen a few-draw
            interval (:func:`autobatch.noise.estimator.student_width`).
        max_micro_batch_size: the largest micro-batch that fits in memory, or None (no
            limit: every step is a single micro-batch).
        step_time_s: median seconds per optimizer step measured at each global batch size
            seen so far (may be empty).
        limited_by: what limits the run: ``"samples"`` (epochs or ``max_samples``; the
            default) or ``"steps"`` (``max_steps`` alone); see
            :attr:`autobatch.run_length.RunLength.limited_by`.
        train_loss: the last step's mean training loss (NaN if unknown).
        max_lr_factor: the cap the controller puts on the LR rule's factor (None: none).
        lr_rule: the LR rule's factor at a global batch size, at the current noise estimate
            and before ``max_lr_factor`` (None when the controller does not say).
        progress: the fraction of the run done, in ``[0, 1]``: samples seen over the samples
            allowed (``limited_by="samples"``) or steps over ``max_steps``; NaN when the loop
            does not say.
        lr_scheduled: whether the user's LR scheduler shapes the base LR (``fit``'s
            ``lr_scheduler``, or a trainer's decaying schedule): the run's LR decay is theirs.
        lr_decay: the user's schedule now, as a fraction of its peak so far: the last
            step's base LR over the largest base LR of the run (1 without a scheduler,
            during warm-up and at the peak; 0.1 at the end of a cosine to 10%).
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
    noise_scale_stderr: float = math.inf
    grad_sq_mean: float = math.nan
    trace_cov: float = math.nan
    grad_sq_stderr: float = math.inf
    trace_cov_stderr: float = math.inf
    grad_sq_dof: float = math.inf
    trace_cov_dof: float = math.inf
    max_micro_batch_size: int | None = None
    step_time_s: dict[int, float] = field(default_factory=dict)
    limited_by: str = "samples"
    # compare=False: a context restored from a checkpoint equals the original although the
    # last loss (a per-step input, NaN before any) and the bound rule are not the same objects.
    train_loss: float = field(default=math.nan, compare=False)
    max_lr_factor: float | None = None
    lr_rule: Callable[[int], float] | None = field(default=None, compare=False)
    progress: float = math.nan
    lr_scheduled: bool = False
    lr_decay: float = 1.0


class BatchSizePolicy(ABC):
    """Proposes the next global batch size; may also scale the LR (a schedule).

    A subclass needs only :meth:`propose`. The class attributes below matter only to
    built-in policies that :mod:`autobatch.registry` builds from a config by name.

    Attributes:
        config_settings: the ``FitConfig`` settings the registry passes to the constructor,
            constructor keyword -> setting name.
        default_lr_scaling: the LR rule used when the config leaves ``lr_scaling`` unset;
            None keeps the optimizer family's default.
    """

    config_settings: ClassVar[Mapping[str, str]] = {}
    default_lr_scaling: ClassVar[str | None] = None

    @abstractmethod
    def propose(self, ctx: PolicyContext) -> int:
        """The global batch size for the next steps (may equal ``ctx.batch_size``)."""

    def lr_factor(self, ctx: PolicyContext) -> float:
        """Extra LR multiplier on top of the scaling rule (1 unless the policy schedules).
        A read, called for every step's LR: it must not change the policy's state."""
        return 1.0

    def observe(self, ctx: PolicyContext) -> None:
        """See one finished step (``ctx.step`` is its number, ``ctx.train_loss`` its mean
        loss), once per step, after the estimator took its norms. A no-op by default; the
        budget policy feeds its loss-spike guard here."""

    @classmethod
    def check_settings(cls, **settings: Any) -> dict[str, str]:
        """What is wrong with these constructor keywords, as keyword -> message.

        A config that names the policy reports these problems together with its other
        invalid fields (the registry calls this with the config's values); a constructor
        with such rules calls it too, so that both say the same. None by default.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The policy's mutable state, for checkpoints (the built-in policies have none:
        they decide from the context alone)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


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


# -- helpers shared by the built-in policies ---------------------------------------------------
def growth_window(current: int, max_growth: float, lo: int, hi: int) -> tuple[int, int]:
    """``[lo, hi]`` narrowed to sizes within a factor ``max_growth`` of ``current``."""
    a = max(lo, math.ceil(current / max_growth - 1e-9))
    b = min(hi, math.floor(current * max_growth + 1e-9))
    return (a, b) if a <= b else (lo, hi)  # current far outside [lo, hi]: just clip


def keep_unless_material(current: int, proposal: int, hysteresis: float) -> int:
    """``proposal`` if it differs from ``current`` by more than ``hysteresis`` (relative),
    else ``current``: small moves are not worth a change of batch size."""
    return proposal if abs(proposal - current) > hysteresis * current else current


def milestones_passed(milestones: list[int], epoch: float) -> int:
    """How many of the epoch ``milestones`` lie at or before ``epoch``."""
    return sum(1 for m in milestones if epoch >= m)
