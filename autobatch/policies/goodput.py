"""``goodput``: maximise throughput x statistical efficiency (Pollux, Qiao et al., OSDI 2021).

The model is plain functions over numbers (:func:`statistical_efficiency`,
:func:`fit_step_time`, :func:`goodput`) that a test can check by hand; :class:`GoodputPolicy`
evaluates it over the allowed sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from autobatch.policies.base import (
    BatchSizePolicy,
    PolicyContext,
    growth_window,
    keep_unless_material,
    round_batch_size,
)

__all__ = ["GoodputPolicy", "fit_step_time", "goodput", "statistical_efficiency"]


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


class GoodputPolicy(BatchSizePolicy):
    """Maximise goodput = throughput x statistical efficiency (Pollux, OSDI 2021).

    Throughput comes from the measured step times through the model of
    :func:`fit_step_time`; efficiency is ``(B_noise + B0)/(B_noise + B)``. Every allowed size
    (see :func:`~autobatch.policies.round_batch_size`) within a factor ``max_growth`` of the
    current one is evaluated, the best is taken (the smallest on a tie), and kept only if it
    differs from the current size by more than ``hysteresis``. No change before the noise
    estimate is ready or while no step time is known.
    """

    config_settings: ClassVar[Mapping[str, str]] = {
        "max_growth": "max_growth",
        "hysteresis": "hysteresis",
        "round_to": "round_to",
    }

    def __init__(self, *, max_growth: float = 2.0, hysteresis: float = 0.05, round_to: int = 8) -> None:
        self.max_growth = max_growth
        self.hysteresis = hysteresis
        self.round_to = round_to

    def propose(self, ctx: PolicyContext) -> int:
        noise = ctx.noise_scale
        if not ctx.noise_ready or not math.isfinite(noise) or noise <= 0.0 or not ctx.step_time_s:
            return ctx.batch_size
        t0, t1 = fit_step_time(ctx.step_time_s, ctx.max_micro_batch_size)
        lo, hi = growth_window(ctx.batch_size, self.max_growth, ctx.min_batch_size, ctx.max_batch_size)
        sizes = _allowed_sizes(lo, hi, self.round_to)
        values = goodput(sizes, ctx.base_batch_size, noise, t0, t1, ctx.max_micro_batch_size)
        proposal = int(sizes[int(np.argmax(values))])
        return keep_unless_material(ctx.batch_size, proposal, self.hysteresis)
