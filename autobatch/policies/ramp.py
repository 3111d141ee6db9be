"""``ramp``: grow the batch where a step schedule would decay the LR (Smith, Kindermans, Ying &
Le 2017, "Don't decay the learning rate, increase the batch size")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from autobatch.policies.base import (
    BatchSizePolicy,
    PolicyContext,
    milestones_passed,
    round_batch_size,
)

__all__ = ["RampPolicy"]


class RampPolicy(BatchSizePolicy):
    """Grow the batch instead of decaying the LR (Smith, Kindermans, Ying & Le 2017).

    At each milestone passed (``epoch >= milestone``) the wanted batch is multiplied by
    ``1/lr_decay``: ``B0 / lr_decay^n`` after ``n`` milestones. Once that exceeds
    ``max_batch_size`` the batch stays at the cap and :meth:`lr_factor` returns the rest of
    the decay, ``B_cap / wanted``, so that ``LR / B`` (the SGD noise) follows the step
    schedule. Use it with ``lr_scaling="none"`` (the default a config picks for it): scaling
    the LR up with ``B`` would undo the noise reduction the ramp is for. Decisions follow the
    epoch alone (no growth limit, no hysteresis).

    Raises:
        ValueError: without milestones, or unless ``0 < lr_decay < 1`` (both reported).
    """

    config_settings: ClassVar[Mapping[str, str]] = {
        "lr_milestones": "lr_milestones",
        "lr_decay": "lr_decay",
        "round_to": "round_to",
    }
    # The ramp replaces LR decay by batch growth: the LR must not also grow with B, or the
    # noise LR/B would not fall. A config that names a rule explicitly keeps it.
    default_lr_scaling: ClassVar[str | None] = "none"

    def __init__(self, *, lr_milestones: list[int], lr_decay: float = 0.1, round_to: int = 8) -> None:
        problems = self.check_settings(lr_milestones=lr_milestones, lr_decay=lr_decay)
        if problems:
            raise ValueError("; ".join(problems.values()))
        self.lr_milestones = list(lr_milestones)
        self.lr_decay = lr_decay
        self.round_to = round_to

    @classmethod
    def check_settings(cls, **settings: Any) -> dict[str, str]:
        problems = {}
        milestones, decay = settings.get("lr_milestones"), settings.get("lr_decay", 0.1)
        if not milestones:
            problems["lr_milestones"] = (
                f"RampPolicy needs lr_milestones (got lr_milestones={milestones!r}); give the "
                "epochs at which a step schedule would decay the LR, e.g. lr_milestones=[30, 60]"
            )
        if not 0.0 < decay < 1.0:
            problems["lr_decay"] = (
                f"RampPolicy needs 0 < lr_decay < 1 (got lr_decay={decay}); the batch grows by "
                "1/lr_decay at each milestone, e.g. lr_decay=0.1"
            )
        return problems

    def _wanted_and_capped(self, ctx: PolicyContext) -> tuple[float, int]:
        n = milestones_passed(self.lr_milestones, ctx.epoch)
        wanted = ctx.base_batch_size / self.lr_decay**n
        if n == 0:  # B0 is the user's choice: start there, rounded or not
            return wanted, ctx.base_batch_size
        return wanted, round_batch_size(wanted, self.round_to, ctx.min_batch_size, ctx.max_batch_size)

    def propose(self, ctx: PolicyContext) -> int:
        return self._wanted_and_capped(ctx)[1]

    def lr_factor(self, ctx: PolicyContext) -> float:
        wanted, size = self._wanted_and_capped(ctx)
        return 1.0 if wanted <= ctx.max_batch_size else size / wanted
