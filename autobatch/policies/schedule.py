"""``schedule``: the user's LR decay turned into batch growth, bounded by the noise scale.

Where the user's ``lr_scheduler`` decays the LR by a factor ``k`` from its peak, this policy
multiplies the batch by ``k`` instead, and the LR rule turns the rest into LR: the LR of a
step is ``s(t) x rule(B / B0)``, ``s(t)`` the schedule's LR as written. With ``d = s(t) /
peak`` (1 during warm-up and at the peak) the wanted batch is ``B0 / d``:

- Adam-family optimizers, square-root rule (their default): ``LR = peak x d x sqrt(1/d) =
  peak x sqrt(d)``: every halving of the LR becomes a doubling of B with the LR x 1/sqrt(2),
  the Seesaw rule (Meterez et al. 2025, arXiv 2510.14717), which matched cosine's loss at
  equal tokens in fewer steps;
- SGD, linear rule: ``LR = peak``: a decay by ``k`` becomes ``B x k`` at a constant LR
  (Smith, Kindermans, Ying & Le 2017). SGD's default rule, AdaScale, gives at most the linear
  factor (less above the noise scale, where this policy does not go).

The batch never grows past what the noise scale supports: ``B <= max(B0, noise_multiplier x
B_simple)`` (the smoothed estimate; before it is ready the batch stays). Past that bound (or
``max_batch_size``) the rest of the decay stays on the LR, as the schedule wrote it. Each
decision moves at most ``max_growth`` times, skips changes under ``hysteresis`` and rounds to
``round_to``, as ``gns`` does.

The LR under this policy never exceeds the schedule's peak (``rule(B) x d <= 1`` for ``B <=
B0 / d``), so ``max_lr_factor`` bounds the LR in those terms: the factor may pass it while
``rule(B) x d`` stays within it (:meth:`SchedulePolicy.lr_factor`).

Needs a user ``lr_scheduler`` (``fit`` refuses the policy without one); any scheduler works,
``LambdaLR`` included, since only the LR it sets is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from autobatch.policies.base import (
    BatchSizePolicy,
    PolicyContext,
    growth_window,
    keep_unless_material,
    round_batch_size,
)

__all__ = ["SchedulePolicy"]


class SchedulePolicy(BatchSizePolicy):
    """Grow the batch where the user's LR schedule decays (see the module docstring).

    Args:
        noise_multiplier: the bound is ``noise_multiplier x B_simple``.
        max_growth: the most one decision may multiply (or divide) the batch by, > 1.
        hysteresis: relative changes below this are skipped.
        round_to: batch sizes above it are multiples of it.
        noise_bound: bound the batch by the noise scale (True); False follows the schedule
            alone (up to ``max_batch_size``), as a plain Seesaw schedule.

    Raises:
        ValueError: for ``noise_multiplier <= 0`` or ``max_growth <= 1`` (both reported).
    """

    config_settings: ClassVar[Mapping[str, str]] = {
        "noise_multiplier": "noise_multiplier",
        "max_growth": "max_growth",
        "hysteresis": "hysteresis",
        "round_to": "round_to",
    }
    # None: the optimizer family's rule (square root for Adam: Seesaw; AdaScale for SGD).
    default_lr_scaling: ClassVar[str | None] = None

    def __init__(self, *, noise_multiplier: float = 1.0, max_growth: float = 2.0, hysteresis: float = 0.05,
                 round_to: int = 8, noise_bound: bool = True) -> None:
        problems = self.check_settings(noise_multiplier=noise_multiplier, max_growth=max_growth)
        if problems:
            raise ValueError("; ".join(problems.values()))
        self.noise_multiplier = noise_multiplier
        self.max_growth = max_growth
        self.hysteresis = hysteresis
        self.round_to = round_to
        self.noise_bound = noise_bound

    @classmethod
    def check_settings(cls, **settings: Any) -> dict[str, str]:
        problems = {}
        if not settings.get("noise_multiplier", 1.0) > 0:
            problems["noise_multiplier"] = (f"noise_multiplier must be > 0 (got {settings['noise_multiplier']}); "
                                            "e.g. 1.0")
        if not settings.get("max_growth", 2.0) > 1:
            problems["max_growth"] = f"max_growth must be > 1 (got {settings['max_growth']}); e.g. 2.0"
        return problems

    def wanted(self, ctx: PolicyContext) -> float:
        """The batch the schedule's decay asks for, ``B0 / d``, before the noise bound."""
        return ctx.base_batch_size / max(ctx.lr_decay, 1e-12)

    def bound(self, ctx: PolicyContext) -> float:
        """The largest batch the noise scale supports now: ``max(B0, noise_multiplier x
        B_simple)``; the current batch while the estimate is not ready; inf without the bound."""
        if not self.noise_bound:
            return math.inf
        noise = ctx.noise_scale
        if not ctx.noise_ready or not math.isfinite(noise) or noise <= 0.0:
            return float(ctx.batch_size)
        return max(float(ctx.base_batch_size), self.noise_multiplier * noise)

    def propose(self, ctx: PolicyContext) -> int:
        target = min(self.wanted(ctx), self.bound(ctx))
        lo, hi = growth_window(ctx.batch_size, self.max_growth, max(ctx.min_batch_size, ctx.base_batch_size),
                               ctx.max_batch_size)
        proposal = round_batch_size(target, self.round_to, lo, hi)
        return keep_unless_material(ctx.batch_size, proposal, self.hysteresis)

    def lr_factor(self, ctx: PolicyContext) -> float:
        """Undo the controller's ``max_lr_factor`` cap on the rule as far as the LR stays
        within ``max_lr_factor`` x the schedule's peak: the cap bounds the LR, and a decayed
        schedule times the rule's factor is below its peak."""
        cap = ctx.max_lr_factor
        if cap is None or ctx.lr_rule is None:
            return 1.0
        wanted = ctx.lr_rule(ctx.batch_size)
        capped = min(wanted, cap)
        allowed = min(wanted, cap / max(ctx.lr_decay, 1e-12))
        return allowed / capped if capped > 0 else 1.0
