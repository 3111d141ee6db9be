"""Learning-rate scaling rules: the LR at batch size ``B`` from a base LR tuned at ``B0``.

A rule returns a factor, and the training loop uses ``LR(B) = base_lr * factor``. Batch sizes
are global (examples per optimizer step); ``grad_sq = |G|^2`` and ``trace_cov = tr(Sigma)``
are the gradient noise scale estimator's averages for a *mean-reduced* loss (see
:mod:`autobatch.noise.estimator`), ``B_noise = trace_cov / grad_sq``.

The rules:

- ``linear`` (Goyal et al. 2017): ``B / B0``, for SGD below the critical batch size.
- ``sqrt`` (Malladi et al. 2022): ``sqrt(B / B0)``, for Adam-family optimizers.
- ``adascale`` (Johnson et al. 2020): the gain ``r = (s2 + m2) / (s2/S + m2)`` with
  ``s2 = tr(Sigma)/B0``, ``m2 = |G|^2``, ``S = B/B0``. It lies between 1 and ``S`` and equals
  ``eps_opt(B) / eps_opt(B0)`` in McCandlish et al.'s (2018) model.
- ``none``: 1.

The LR cannot keep growing past the critical batch size: ``eps_opt(B)`` saturates at
``eps_max``, so ``eps_opt(B) / eps_opt(B0)`` never exceeds ``1 + B_noise/B0`` (the limit of the
AdaScale gain as ``S`` grows). ``linear`` and ``sqrt`` therefore cap their factor there when the
noise scale is known (``cap_at_noise_scale=True``, the default); on MNIST-1D with plain SGD
the uncapped linear rule diverged once ``B`` passed ~4x ``B0`` (design note gns.md).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod

import torch

__all__ = [
    "SCALINGS",
    "AdaScaleScaling",
    "LRScaling",
    "LinearScaling",
    "NoScaling",
    "SqrtScaling",
    "adascale_gain",
    "default_scaling",
    "linear_factor",
    "make_scaling",
    "noise_cap",
    "sqrt_factor",
]


# -- the maths ---------------------------------------------------------------------------------
def _check_sizes(batch_size: int, base_batch_size: int) -> float:
    if batch_size < 1 or base_batch_size < 1:
        raise ValueError(
            "batch sizes must be >= 1 (got "
            f"batch_size={batch_size}, base_batch_size={base_batch_size})"
        )
    return batch_size / base_batch_size


def linear_factor(batch_size: int, base_batch_size: int) -> float:
    """``B / B0`` (Goyal et al. 2017)."""
    return _check_sizes(batch_size, base_batch_size)


def sqrt_factor(batch_size: int, base_batch_size: int) -> float:
    """``sqrt(B / B0)`` (Malladi et al. 2022)."""
    return math.sqrt(_check_sizes(batch_size, base_batch_size))


def _noise_known(grad_sq: float, trace_cov: float) -> bool:
    return math.isfinite(grad_sq) and math.isfinite(trace_cov) and grad_sq > 0.0


def noise_cap(base_batch_size: int, grad_sq: float, trace_cov: float) -> float:
    """``1 + B_noise / B0``, the most the LR may grow over its value at ``B0``.

    It is ``eps_max / eps_opt(B0)`` in McCandlish et al.'s model, where
    ``eps_opt(B) = eps_max / (1 + B_noise/B)``. ``inf`` when the noise is unknown (a NaN or
    infinite input, or ``grad_sq <= 0``); a negative ``trace_cov`` counts as no noise (cap 1).
    """
    if not _noise_known(grad_sq, trace_cov):
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
    scale = _check_sizes(batch_size, base_batch_size)
    lo, hi = min(1.0, scale), max(1.0, scale)
    if not _noise_known(grad_sq, trace_cov):
        return lo
    s2 = max(trace_cov, 0.0) / base_batch_size
    gain = (s2 + grad_sq) / (s2 / scale + grad_sq)
    return min(max(gain, lo), hi)  # only rounding can take it outside; keep the bound exact


# -- the plug-in family ------------------------------------------------------------------------
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
            grad_sq: ``|G|^2`` of a mean-reduced loss; NaN when not (yet) measured.
            trace_cov: ``tr(Sigma)``; NaN when not (yet) measured.
        """

    def state_dict(self) -> dict:
        """State to checkpoint (stateless rules return ``{}``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _CappedScaling(LRScaling):
    def __init__(self, *, cap_at_noise_scale: bool = True) -> None:
        self.cap_at_noise_scale = cap_at_noise_scale

    def factor(
        self,
        batch_size: int,
        base_batch_size: int,
        *,
        grad_sq: float = math.nan,
        trace_cov: float = math.nan,
    ) -> float:
        value = self._rule(batch_size, base_batch_size)
        if self.cap_at_noise_scale and value > 1.0:
            value = min(value, noise_cap(base_batch_size, grad_sq, trace_cov))
        return value

    @staticmethod
    @abstractmethod
    def _rule(batch_size: int, base_batch_size: int) -> float: ...


class LinearScaling(_CappedScaling):
    """``B / B0``, capped at ``1 + B_noise/B0`` when the noise is known and
    ``cap_at_noise_scale`` is true. For SGD."""

    _rule = staticmethod(linear_factor)


class SqrtScaling(_CappedScaling):
    """``sqrt(B / B0)``, capped at ``1 + B_noise/B0`` when the noise is known and
    ``cap_at_noise_scale`` is true. For Adam-family optimizers."""

    _rule = staticmethod(sqrt_factor)


class AdaScaleScaling(LRScaling):
    """The AdaScale gain :func:`adascale_gain`; 1 (no increase) until the noise is known."""

    def factor(
        self,
        batch_size: int,
        base_batch_size: int,
        *,
        grad_sq: float = math.nan,
        trace_cov: float = math.nan,
    ) -> float:
        return adascale_gain(batch_size, base_batch_size, grad_sq, trace_cov)


class NoScaling(LRScaling):
    """The LR does not depend on the batch size."""

    def factor(
        self,
        batch_size: int,
        base_batch_size: int,
        *,
        grad_sq: float = math.nan,
        trace_cov: float = math.nan,
    ) -> float:
        _check_sizes(batch_size, base_batch_size)
        return 1.0


SCALINGS: dict[str, type[LRScaling]] = {
    "linear": LinearScaling,
    "sqrt": SqrtScaling,
    "adascale": AdaScaleScaling,
    "none": NoScaling,
}


def make_scaling(name_or_instance: str | LRScaling) -> LRScaling:
    """An :class:`LRScaling` from a name in :data:`SCALINGS` or an instance (returned as is).

    Raises:
        ValueError: for an unknown name (the message lists the allowed ones).
    """
    if isinstance(name_or_instance, LRScaling):
        return name_or_instance
    cls = SCALINGS.get(name_or_instance) if isinstance(name_or_instance, str) else None
    if cls is None:
        raise ValueError(
            f"unknown lr_scaling {name_or_instance!r}; allowed: {', '.join(sorted(SCALINGS))} "
            "or an LRScaling instance"
        )
    return cls()


def default_scaling(optimizer: object) -> str:
    """The default rule's name for an optimizer family.

    ``"adascale"`` for SGD (``torch.optim.SGD`` and subclasses, or the name ``"sgd"``): the
    linear rule's ideal below the critical batch, bounded above it. ``"sqrt"`` for everything
    else, which in practice means adaptive optimizers (Adam, AdamW, RMSprop, Adagrad, ...),
    whose square-root rule (Malladi et al. 2022) is also the milder guess for unknown ones.

    Args:
        optimizer: an optimizer instance, class, ``functools.partial`` of a class, or name.
    """
    target = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    if isinstance(target, str):
        is_sgd = target.lower() == "sgd"
    else:
        cls = target if isinstance(target, type) else type(target)
        is_sgd = issubclass(cls, torch.optim.SGD)
    return "adascale" if is_sgd else "sqrt"
