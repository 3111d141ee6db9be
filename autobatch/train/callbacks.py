"""Hooks into ``autobatch.fit``: a small base class and the stock callbacks.

A callback sees each finished step and each evaluation. To end training early, raise
:class:`StopTraining` from a hook: fit finishes cleanly (final evaluation, checkpoint) and
reports ``stopped_by="callback"``. Any other exception (for example ``optuna.TrialPruned``)
propagates to the caller unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autobatch.train.results import FitResult, StepRecord

__all__ = ["Callback", "StopAtTarget", "StopTraining"]


class StopTraining(Exception):
    """Raised by a callback to end a fit early and cleanly."""


class Callback:
    """Base class; override the hooks you need (all are no-ops here)."""

    def on_step_end(self, record: StepRecord) -> None:
        """After every optimizer step (skipped steps included, with ``record.skipped``)."""

    def on_eval(self, step: int, samples: int, metrics: dict[str, float]) -> None:
        """After every evaluation of ``val_data``; ``metrics`` has e.g. ``val_loss``."""

    def on_fit_end(self, result: FitResult) -> None:
        """Once, with the finished result."""


class StopAtTarget(Callback):
    """Stop when an evaluated metric reaches a target, and remember when it did.

    Args:
        metric: key in the evaluation metrics, e.g. ``"val_accuracy"``.
        target: the value to reach.
        mode: ``"max"`` (reach ``>= target``) or ``"min"`` (reach ``<= target``).
        stop: end training when reached (False only records the step).

    Attributes:
        reached_step, reached_samples: step and examples processed at the first evaluation
            that met the target (None until then).
    """

    def __init__(self, metric: str, target: float, *, mode: str = "max", stop: bool = True) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min' (got mode={mode!r})")
        self.metric, self.target, self.mode, self.stop = metric, target, mode, stop
        self.reached_step: int | None = None
        self.reached_samples: int | None = None

    def on_eval(self, step: int, samples: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise KeyError(
                f"StopAtTarget watches {self.metric!r}, but the evaluation gave "
                f"{sorted(metrics)}; pick one of those"
            )
        value = metrics[self.metric]
        hit = math.isfinite(value) and (value >= self.target if self.mode == "max" else value <= self.target)
        if hit and self.reached_step is None:
            self.reached_step, self.reached_samples = step, samples
        if hit and self.stop:
            raise StopTraining(f"{self.metric}={value:.4g} reached target {self.target}")
