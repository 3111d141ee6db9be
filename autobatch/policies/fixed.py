"""``fixed``: keep the initial batch and step-decay the LR (the baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from autobatch.policies.base import BatchSizePolicy, PolicyContext, milestones_passed

__all__ = ["FixedPolicy"]


class FixedPolicy(BatchSizePolicy):
    """Keep ``B0``; multiply the LR by ``lr_decay`` at each milestone passed (step decay)."""

    config_settings: ClassVar[Mapping[str, str]] = {"lr_milestones": "lr_milestones", "lr_decay": "lr_decay"}

    def __init__(self, *, lr_milestones: list[int] | None = None, lr_decay: float = 0.1) -> None:
        self.lr_milestones = list(lr_milestones or [])
        self.lr_decay = lr_decay

    def propose(self, ctx: PolicyContext) -> int:
        return ctx.base_batch_size

    def lr_factor(self, ctx: PolicyContext) -> float:
        return self.lr_decay ** milestones_passed(self.lr_milestones, ctx.epoch)
