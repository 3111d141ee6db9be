"""The built-in LR rules, named as in :data:`autobatch.registry.LR_SCALINGS`, and the default
rule for an optimizer family.

The rules that read the noise scale (all but ``none``) keep the last usable estimate they were
given and use it while the estimate is lost: late in training the averaged ``|G|^2`` can fall
to <= 0 (the loop then reports the noise as unknown), and falling back to the no-noise answer
made the LR flip between two values from one step to the next (AdaScale on sklearn digits:
~100 LR changes in 1,500 steps, with the batch size unchanged). At an unchanged batch size the
held estimate gives the last factor again.
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

from autobatch.scaling.base import (
    LRScaling,
    adascale_gain,
    check_sizes,
    linear_factor,
    noise_cap,
    noise_known,
    sqrt_factor,
)

__all__ = ["AdaScaleScaling", "LinearScaling", "NoScaling", "SqrtScaling", "default_scaling"]


class _NoiseReadingScaling(LRScaling):
    """A rule that reads the noise and holds the last usable ``(grad_sq, trace_cov)``."""

    def __init__(self) -> None:
        self._held = (math.nan, math.nan)

    def _noise(self, grad_sq: float, trace_cov: float) -> tuple[float, float]:
        """The given estimate when usable (and remember it), else the last usable one (NaNs
        before any)."""
        if noise_known(grad_sq, trace_cov):
            self._held = (float(grad_sq), float(trace_cov))
        return self._held

    def state_dict(self) -> dict[str, Any]:
        """The held estimate (NaNs before any)."""
        return {"held_grad_sq": self._held[0], "held_trace_cov": self._held[1]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._held = (float(state["held_grad_sq"]), float(state["held_trace_cov"]))


class _CappedScaling(_NoiseReadingScaling):
    def __init__(self, *, cap_at_noise_scale: bool = True) -> None:
        super().__init__()
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
        held = self._noise(grad_sq, trace_cov)
        if self.cap_at_noise_scale and value > 1.0:
            value = min(value, noise_cap(base_batch_size, *held))
        return value

    @staticmethod
    @abstractmethod
    def _rule(batch_size: int, base_batch_size: int) -> float: ...


class LinearScaling(_CappedScaling):
    """``B / B0``, capped at ``1 + B_noise/B0`` when the noise is known and
    ``cap_at_noise_scale`` is true (a lost estimate keeps the last cap). For SGD."""

    _rule = staticmethod(linear_factor)


class SqrtScaling(_CappedScaling):
    """``sqrt(B / B0)``, capped at ``1 + B_noise/B0`` when the noise is known and
    ``cap_at_noise_scale`` is true (a lost estimate keeps the last cap). For Adam-family
    optimizers."""

    _rule = staticmethod(sqrt_factor)


class AdaScaleScaling(_NoiseReadingScaling):
    """The AdaScale gain :func:`~autobatch.scaling.adascale_gain`: ``min(1, B/B0)`` until the
    noise is first known, then the gain at the last usable estimate."""

    def factor(
        self,
        batch_size: int,
        base_batch_size: int,
        *,
        grad_sq: float = math.nan,
        trace_cov: float = math.nan,
    ) -> float:
        return adascale_gain(batch_size, base_batch_size, *self._noise(grad_sq, trace_cov))


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
