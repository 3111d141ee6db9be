"""``fit``'s optimizer: built from the user's spec, and its LR set for every step.

The LR of a step is ``base LR x factor``: the base LR is the optimizer's own (what the user
tuned at the base batch B0) or, with a user's ``lr_scheduler``, the scheduler's at this point
of its clock; the factor is the controller's
(:meth:`~autobatch.train.controller.BatchSizeController.lr_factor`: LR rule at B, cap, policy
factor, warm-up).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autobatch.optimizers import OptimizerSpec, build_optimizer

__all__ = ["OptimizerScaling", "set_lr", "setup_optimizer"]


def setup_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float | None,
                    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
                    ) -> tuple[torch.optim.Optimizer, list[float], Any]:
    """``(optimizer, base_lrs, scheduler)``: the optimizer of ``spec``
    (:mod:`autobatch.optimizers`) over the model, its param groups' LRs before any schedule,
    and the user's scheduler built over it (None without one).

    Raises:
        ValueError: for a spec that cannot be built, with both ways out when no LR is given.
    """
    try:
        opt = build_optimizer(spec, model.parameters(), lr)
    except ValueError as err:
        if lr is None and "lr is required" in str(err):
            raise ValueError(f"{err}. In fit: pass lr=..., an optimizer that holds its LR, or lr='auto' "
                             "to choose it with a short study first") from None
        raise
    base_lrs = [group["lr"] for group in opt.param_groups]  # before a scheduler's first factor
    return opt, base_lrs, lr_scheduler(opt) if lr_scheduler is not None else None


def set_lr(opt: torch.optim.Optimizer, base_lrs: list[float], scheduler: Any, factor: float,
           clock: int) -> list[float]:
    """Set every param group's LR to its base LR times ``factor``; return the base LRs used.

    With a user's ``scheduler`` the base LRs are the scheduler's, on a clock the caller counts
    in samples: ``clock`` is the number of steps it should have taken (``fit`` passes
    ``samples // initial_batch_size``, one tick per B0 examples), so a schedule written in
    steps of the base batch keeps its meaning when B changes. The scheduler steps on the base
    LRs (restored into the groups first), so a chainable scheduler never compounds
    autobatch's factor.
    """
    bases = base_lrs
    if scheduler is not None:
        if scheduler.last_epoch < clock:
            for group, base in zip(opt.param_groups, scheduler.get_last_lr()):
                group["lr"] = base
            with warnings.catch_warnings():  # "step() before optimizer.step()" after a skip
                warnings.simplefilter("ignore", UserWarning)
                while scheduler.last_epoch < clock:
                    scheduler.step()
        bases = scheduler.get_last_lr()
    for group, base in zip(opt.param_groups, bases):
        group["lr"] = base * factor
    return bases


class OptimizerScaling:
    """Keeps Adam's betas and AdamW's weight decay per example as B changes (the config's
    ``scale_betas`` and ``scale_weight_decay``; :class:`~autobatch.config.LRConfig`).

    The user's values (those of the param groups when built, at ``B0``) are kept here; each
    step, :meth:`apply` sets every group's ``betas`` to ``(beta1^r, beta2^r)`` (``beta1``
    unscaled with ``"beta2"``) and ``weight_decay`` to ``wd x r / f``, with ``r = B / B0``
    and ``f`` the LR factor autobatch applies at B. A checkpoint needs nothing more: the
    values are functions of B and the factor, restored with the controller.

    Args:
        optimizer: the optimizer, as built (before any step).
        betas: ``"none"``, ``"beta2"`` or ``"both"``.
        weight_decay: whether to scale ``weight_decay``.

    Raises:
        ValueError: for scaling asked of an optimizer whose groups hold no ``betas`` (or no
            ``weight_decay``), naming the optimizer and the setting.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, betas: str = "none", weight_decay: bool = False) -> None:
        groups = optimizer.param_groups
        name = type(optimizer).__name__
        if betas != "none" and not all("betas" in g for g in groups):
            raise ValueError(f"scale_betas={betas!r} scales Adam's betas, but {name}'s param groups hold none; "
                             "leave scale_betas='none' for this optimizer")
        if weight_decay and not all("weight_decay" in g for g in groups):
            raise ValueError(f"scale_weight_decay=True scales weight_decay, but {name}'s param groups hold none; "
                             "leave it False for this optimizer")
        self.betas, self.weight_decay = betas, weight_decay
        self._base = [(tuple(g["betas"]) if betas != "none" else None,
                       float(g["weight_decay"]) if weight_decay else None) for g in groups]

    @property
    def active(self) -> bool:
        """Whether anything is scaled."""
        return self.betas != "none" or self.weight_decay

    def apply(self, optimizer: torch.optim.Optimizer, batch_ratio: float, lr_factor: float) -> None:
        """Set the groups' betas and weight decay for ``B / B0 = batch_ratio`` at LR factor
        ``lr_factor`` (> 0)."""
        for group, (betas, wd) in zip(optimizer.param_groups, self._base):
            if betas is not None:
                beta1, beta2 = betas
                group["betas"] = (beta1**batch_ratio if self.betas == "both" else beta1, beta2**batch_ratio)
            if wd is not None:
                group["weight_decay"] = wd * batch_ratio / lr_factor
