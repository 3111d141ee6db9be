"""``measure``: watch the noise scale on your own fixed-B run, changing nothing.

For a user who wants to see whether B_simple tracks the critical batch of their problem before
letting a policy act on it: B stays ``B0`` (the trainer's own batch in the integrations), the
LR stays the base LR (the default LR rule is ``none``, and no milestone decays it), and the
estimator runs and is recorded (``StepRecord.noise_scale``, ``gns/noise_scale`` in the
loggers). What it costs is the estimator's cost alone (``docs/benchmarks/fit_overhead.md``).
"""

from __future__ import annotations

from typing import ClassVar

from autobatch.policies.base import BatchSizePolicy, PolicyContext

__all__ = ["MeasurePolicy"]


class MeasurePolicy(BatchSizePolicy):
    """Keep ``B0`` and the base LR; the noise scale is only measured.

    Unlike ``fixed``, no LR decay at ``lr_milestones`` (a user's ``lr_scheduler`` still shapes
    the base LR), and it needs the estimator (``gns_method`` other than ``"off"``).
    """

    default_lr_scaling: ClassVar[str | None] = "none"

    def propose(self, ctx: PolicyContext) -> int:
        return ctx.base_batch_size
