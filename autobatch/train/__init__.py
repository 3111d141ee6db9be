"""Training: the :func:`fit` loop and the pieces a custom loop reuses.

- :mod:`~autobatch.train.fit`: the loop; :mod:`~autobatch.train._setup`: its setup.
- :mod:`~autobatch.train.controller`: batch size, micro-batch split, LR factor, decisions.
- :mod:`~autobatch.train.sampler`: the seeded sample stream (any B, nothing skipped).
- :mod:`~autobatch.train.checkpoint`, :mod:`~autobatch.train.callbacks`,
  :mod:`~autobatch.train.results`, :mod:`~autobatch.train.evaluate`.
- :mod:`~autobatch.train.distributed`: torchrun / DDP plumbing.
"""

from __future__ import annotations

from autobatch.train.callbacks import Callback, StopAtTarget, StopTraining
from autobatch.train.controller import BatchSizeController
from autobatch.train.evaluate import evaluate
from autobatch.train.fit import fit
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
    "evaluate",
    "fit",
]
