"""Training: the loop behind :func:`autobatch.fit` and the pieces a custom loop reuses.

- :mod:`~autobatch.train.loop`: the loop, read top to bottom; its setup functions live in
  :mod:`~autobatch.train.device` (device, precision, memory cap),
  :mod:`~autobatch.train.optimizer` (optimizer, LR per step) and
  :mod:`~autobatch.train.data_loader` (sample order, micro-batches); one step's work in
  :mod:`~autobatch.train.step`, its norms in :mod:`~autobatch.train.step_norms`.
- :mod:`~autobatch.train.controller`: batch size, micro-batch split, LR factor, decisions.
- :mod:`~autobatch.train.sampler`: the seeded sample stream (any B, nothing skipped).
- :mod:`~autobatch.train.checkpoint`, :mod:`~autobatch.train.callbacks`,
  :mod:`~autobatch.train.results`.
- :mod:`~autobatch.train.distributed`: torchrun / DDP plumbing.
"""

from __future__ import annotations

from autobatch.train.callbacks import Callback, StopAtTarget, StopTraining
from autobatch.train.controller import BatchSizeController, build_controller
from autobatch.train.loop import train
from autobatch.train.results import FitResult, StepRecord
from autobatch.train.sampler import SampleStream

__all__ = [
    "BatchSizeController",
    "Callback",
    "FitResult",
    "SampleStream",
    "StepRecord",
    "StopAtTarget",
    "StopTraining",
    "build_controller",
    "train",
]
