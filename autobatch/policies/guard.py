"""A stability guard for the LR factor: a loss-spike detector (plain floats, no torch).

Raising the LR with the batch keeps SGD's noise temperature ``LR/B`` (Smith & Le 2017) only
as long as the larger LR is stable. Near the stability edge it is not: on the MNIST-1D CNN
(plain SGD, base LR 0.2, B0 = 32) doubling both LR and batch made the train loss jump from
0.53 to 1.20 (4-epoch means) a third of the way into a 40-epoch run, and the run finished
2.2 points below fixed B0. A curvature estimate (power-iteration ``lambda_max`` against
``2/LR``) did not tell the harmful increases from the harmless ones there (at base LR 0.05,
``2/lambda_max`` was 0.08-0.12 and LR 0.1 still helped), so the guard watches the symptom
instead: the smoothed training loss rising well above its running minimum.

:class:`LossSpikeGuard` keeps an exponential moving average of the per-step training loss
(bias-corrected, Adam-style) and its minimum since the last reset. Each loss enters the
average clipped at ``outlier_clip`` times the average so far: one bad batch is not an
instability (at base LR 0.05, where doubling LR and batch helped on every seed, a single batch
with loss 3.35 against an average of 0.19 was enough to trip an unclipped guard; the real
instabilities at base LR 0.1 and 0.2 raised the loss for hundreds of steps and tripped the
clipped guard all the same, at epochs 9-13 and 29-38). When the average exceeds
``spike_ratio`` times that minimum while the LR factor in use is above 1, it halves the
allowed LR factor (never below 1) and restarts the minimum from the current average, so a
second halving needs a second spike. The policy then brings the batch back to what the new
factor can follow (see :mod:`autobatch.policies.budget`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["LossSpikeGuard"]


class LossSpikeGuard:
    """Halves the allowed LR factor when the smoothed training loss spikes.

    Args:
        spike_ratio: a spike is ``EMA(loss) > spike_ratio x min EMA(loss)`` (> 1).
        smoothing: EMA decay per observed step (0.98: about 50 steps of memory).
        min_updates: observations before the guard may fire (the EMA needs a few).
        cut: the allowed factor is multiplied by this at each spike (in (0, 1)).
        outlier_clip: each loss is clipped at this many times the current average before it
            enters it (> 1; ``math.inf``: no clipping).

    Attributes:
        allowed: the largest LR factor the guard allows now (starts at ``inf``; never
            below 1 once cut).
        spikes: how many spikes it has acted on.
    """

    def __init__(
        self,
        *,
        spike_ratio: float = 1.5,
        smoothing: float = 0.98,
        min_updates: int = 50,
        cut: float = 0.5,
        outlier_clip: float = 3.0,
    ) -> None:
        problems = []
        if not spike_ratio > 1.0:
            problems.append(f"spike_ratio must be > 1 (got spike_ratio={spike_ratio}); e.g. 1.5")
        if not 0.0 <= smoothing < 1.0:
            problems.append(f"smoothing must be in [0, 1) (got smoothing={smoothing}); e.g. 0.98")
        if not 0.0 < cut < 1.0:
            problems.append(f"cut must be in (0, 1) (got cut={cut}); e.g. 0.5")
        if not outlier_clip > 1.0:
            problems.append(f"outlier_clip must be > 1 (got outlier_clip={outlier_clip}); e.g. 3, or math.inf")
        if min_updates < 1:
            problems.append(f"min_updates must be >= 1 (got min_updates={min_updates})")
        if problems:
            raise ValueError("; ".join(problems))
        self.spike_ratio = spike_ratio
        self.smoothing = smoothing
        self.min_updates = min_updates
        self.cut = cut
        self.outlier_clip = outlier_clip
        self.allowed = math.inf
        self.spikes = 0
        self._sum = 0.0  # EMA numerator (biased)
        self._weight = 0.0  # EMA bias-correction denominator, 1 - smoothing^n
        self._updates = 0
        self._min = math.inf
        self._best = math.inf  # lowest EMA of the run (never restarted)

    @property
    def smoothed_loss(self) -> float:
        """The bias-corrected EMA of the loss (NaN before the first observation)."""
        return self._sum / self._weight if self._weight > 0 else math.nan

    def update(self, loss: float, lr_factor: float) -> bool:
        """Observe one step's training loss (mean-reduced, as the loop reports it).

        Args:
            loss: the step's training loss; a non-finite loss is ignored (the loop skips
                such steps and stops after several in a row).
            lr_factor: the LR factor the step used (the guard only cuts a factor above 1).

        Returns:
            True if this observation was a spike and cut :attr:`allowed`.
        """
        if not math.isfinite(loss):
            return False
        if self._weight > 0:
            loss = min(loss, self.outlier_clip * self.smoothed_loss)
        d = self.smoothing
        self._sum = d * self._sum + (1.0 - d) * loss
        self._weight = d * self._weight + (1.0 - d)
        self._updates += 1
        ema = self.smoothed_loss
        if self._updates < self.min_updates:
            return False
        self._best = min(self._best, ema)
        if ema > self.spike_ratio * self._min and lr_factor > 1.0:
            self.allowed = max(1.0, min(self.allowed, lr_factor) * self.cut)
            self.spikes += 1
            self._min = ema
            return True
        self._min = min(self._min, ema)
        return False

    def calm(self) -> bool:
        """Whether the loss is settled: the guard has seen ``min_updates`` losses and their
        average is within ``spike_ratio`` of the lowest average of the run (False while a
        spike, cut or not, has not been recovered from)."""
        return self._updates >= self.min_updates and self.smoothed_loss <= self.spike_ratio * self._best

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`update` and :meth:`calm` depend on."""
        return {"allowed": self.allowed, "spikes": self.spikes, "sum": self._sum,
                "weight": self._weight, "updates": self._updates, "min": self._min, "best": self._best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.allowed, self.spikes = float(state["allowed"]), int(state["spikes"])
        self._sum, self._weight = float(state["sum"]), float(state["weight"])
        self._updates, self._min, self._best = int(state["updates"]), float(state["min"]), float(state["best"])
