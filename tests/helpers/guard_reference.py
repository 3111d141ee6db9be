"""The loss-spike guard's smoothed loss recomputed from a run's per-step training losses."""

from __future__ import annotations

from autobatch.policies.guard import LossSpikeGuard


def smoothed_loss(guard: LossSpikeGuard, losses: list[float]) -> float:
    """The bias-corrected EMA the guard should hold after seeing ``losses`` in order (with its
    outlier clip), computed here independently of its code."""
    ema = weight = 0.0
    for loss in losses:
        loss = min(loss, guard.outlier_clip * ema / weight) if weight else loss
        ema = guard.smoothing * ema + (1 - guard.smoothing) * loss
        weight = guard.smoothing * weight + (1 - guard.smoothing)
    return ema / weight
