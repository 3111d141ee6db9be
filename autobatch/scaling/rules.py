"""The built-in LR rules, named as in :data:`autobatch.registry.LR_SCALINGS`, and the default
rule for an optimizer family."""

from __future__ import annotations

import functools
import math
from abc import abstractmethod

from autobatch.scaling.base import (
    LRScaling,
    adascale_gain,
    check_sizes,
    linear_factor,
    noise_cap,
    sqrt_factor,
)

__all__ = ["AdaScaleScaling", "LinearScaling", "NoScaling", "SqrtScaling", "default_scaling"]


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
    """The AdaScale gain :func:`~autobatch.scaling.adascale_gain`; 1 (no increase) until the
    noise is known."""

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
        check_sizes(batch_size, base_batch_size)
        return 1.0


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
        import torch  # here, so that the rules' maths imports without torch

        cls = target if isinstance(target, type) else type(target)
        is_sgd = issubclass(cls, torch.optim.SGD)
    return "adascale" if is_sgd else "sqrt"
