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

__all__ = ["set_lr", "setup_optimizer"]


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
