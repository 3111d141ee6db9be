"""``gns``: follow the gradient noise scale (McCandlish et al. 2018), on significant evidence."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

from autobatch.noise.estimator import noise_scale_interval
from autobatch.policies.base import (
    BatchSizePolicy,
    PolicyContext,
    growth_window,
    keep_unless_material,
    round_batch_size,
)

__all__ = ["GNSPolicy", "confident_target"]


class GNSPolicy(BatchSizePolicy):
    """Track ``noise_multiplier x B_simple``, the critical batch size's simple proxy.

    Each decision moves towards the target by at most a factor ``max_growth`` (the estimate
    degrades as ``(B_simple/B)^2`` when the batch is far below it, so it is approached in
    steps), keeps the current size unless the change exceeds ``hysteresis`` (relative), clips
    to ``[min, max]`` and rounds with :func:`~autobatch.policies.round_batch_size`. Before the
    estimator is ready the size does not change.

    The estimate is noisy (a single step's relative spread grows as ``B_simple/B``), so the
    policy only moves when the current size lies outside the interval
    :func:`autobatch.noise.estimator.noise_scale_interval` at ``confidence`` standard errors
    (widened as a Student-t interval where a standard error rests on few effective draws:
    early in a run, or with sparse split steps), and then only to the interval's nearer edge:
    B grows when the noise scale is significantly above it and shrinks when it is
    significantly below, instead of following every wobble of the average.
    When the context carries no interval statistics, ``noise_scale +- confidence x
    noise_scale_stderr`` is used.
    """

    config_settings: ClassVar[Mapping[str, str]] = {
        "noise_multiplier": "noise_multiplier",
        "confidence": "noise_confidence",
        "max_growth": "max_growth",
        "hysteresis": "hysteresis",
        "round_to": "round_to",
    }

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

    def propose(self, ctx: PolicyContext) -> int:
        noise = ctx.noise_scale
        if not ctx.noise_ready or not math.isfinite(noise) or noise <= 0.0:
            return ctx.batch_size
        if math.isfinite(ctx.grad_sq_mean) and math.isfinite(ctx.trace_cov):
            low, high = noise_scale_interval(ctx.grad_sq_mean, ctx.trace_cov, ctx.grad_sq_stderr,
                                             ctx.trace_cov_stderr, self.confidence,
                                             grad_sq_dof=ctx.grad_sq_dof, trace_cov_dof=ctx.trace_cov_dof)
        else:
            low, high = noise - self.confidence * ctx.noise_scale_stderr, noise + self.confidence * ctx.noise_scale_stderr
        target = confident_target(ctx.batch_size, low, high)
        if target is None:
            return ctx.batch_size
        lo, hi = growth_window(ctx.batch_size, self.max_growth, ctx.min_batch_size, ctx.max_batch_size)
        proposal = round_batch_size(self.noise_multiplier * target, self.round_to, lo, hi)
        return keep_unless_material(ctx.batch_size, proposal, self.hysteresis)


def confident_target(current: float, low: float, high: float) -> float | None:
    """The edge of the interval ``[low, high]`` nearest to ``current``, or None when
    ``current`` lies inside it (no significant evidence to move). NaN bounds never move."""
    if current < low:
        return low
    if current > high:
        return high
    return None
