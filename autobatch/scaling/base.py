"""The LR rule family: the base class and the plain factor functions the rules are made of.

Batch sizes are global (examples per optimizer step); ``grad_sq = |G|^2`` and ``trace_cov =
tr(Sigma)`` are the gradient noise scale estimator's averages for a *mean-reduced* loss (see
:mod:`autobatch.noise.estimator`), ``B_noise = trace_cov / grad_sq``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

__all__ = ["LRScaling", "adascale_gain", "linear_factor", "noise_cap", "noise_known", "sqrt_factor"]


class LRScaling(ABC):
    """Maps the base LR (tuned at the base batch ``B0``) to the LR at batch ``B``."""

    @abstractmethod
    def factor(
        self,
        batch_size: int,
        base_batch_size: int,
        *,
        grad_sq: float = math.nan,
        trace_cov: float = math.nan,
    ) -> float:
        """The multiplier of the base LR at global batch size ``batch_size``.

        Args:
            batch_size: the current global batch ``B``.
            base_batch_size: ``B0``, where the base LR was tuned.
            grad_sq: ``|G|^2`` of a mean-reduced loss; NaN when not (yet) measured or lost.
            trace_cov: ``tr(Sigma)``; NaN when not (yet) measured or lost.
        """

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (stateless rules return ``{}``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def check_sizes(batch_size: int, base_batch_size: int) -> float:
    """``B / B0`` after checking that both are >= 1.

    Raises:
        ValueError: naming both sizes when either is below 1.
    """
    if batch_size < 1 or base_batch_size < 1:
        raise ValueError(
            "batch sizes must be >= 1 (got "
            f"batch_size={batch_size}, base_batch_size={base_batch_size})"
        )
    return batch_size / base_batch_size


def linear_factor(batch_size: int, base_batch_size: int) -> float:
    """``B / B0`` (Goyal et al. 2017)."""
    return check_sizes(batch_size, base_batch_size)


def sqrt_factor(batch_size: int, base_batch_size: int) -> float:
    """``sqrt(B / B0)`` (Malladi et al. 2022)."""
    return math.sqrt(check_sizes(batch_size, base_batch_size))


def noise_known(grad_sq: float, trace_cov: float) -> bool:
    """Whether ``(grad_sq, trace_cov)`` is a usable estimate: both finite and ``grad_sq > 0``
    (the averaged ``|G|^2`` is <= 0 when the noise swamps the gradient: the estimate is lost)."""
    return math.isfinite(grad_sq) and math.isfinite(trace_cov) and grad_sq > 0.0


def noise_cap(base_batch_size: int, grad_sq: float, trace_cov: float) -> float:
    """``1 + B_noise / B0``, the most the LR may grow over its value at ``B0``.

    It is ``eps_max / eps_opt(B0)`` in McCandlish et al.'s model, where
    ``eps_opt(B) = eps_max / (1 + B_noise/B)``. ``inf`` when the noise is unknown (a NaN or
    infinite input, or ``grad_sq <= 0``); a negative ``trace_cov`` counts as no noise (cap 1).
    """
    if not noise_known(grad_sq, trace_cov):
        return math.inf
    return 1.0 + max(trace_cov, 0.0) / grad_sq / base_batch_size


def adascale_gain(
    batch_size: int, base_batch_size: int, grad_sq: float, trace_cov: float
) -> float:
    """The AdaScale gain ratio ``r = (s2 + m2) / (s2/S + m2)`` (Johnson et al. 2020).

    ``s2 = trace_cov / B0`` is the gradient variance at the base batch, ``m2 = grad_sq``,
    ``S = B / B0``. The result lies between 1 and ``S``. When the noise is unknown (a NaN or
    infinite input, or ``grad_sq <= 0``) it returns the conservative ``min(1, S)``: no LR
    increase, and the linear decrease when ``B < B0``.
    """
    scale = check_sizes(batch_size, base_batch_size)
    lo, hi = min(1.0, scale), max(1.0, scale)
    if not noise_known(grad_sq, trace_cov):
        return lo
    s2 = max(trace_cov, 0.0) / base_batch_size
    gain = (s2 + grad_sq) / (s2 / scale + grad_sq)
    return min(max(gain, lo), hi)  # only rounding can take it outside; keep the bound exact
