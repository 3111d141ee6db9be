"""Hyperparameter studies with Optuna: :func:`tune_lr` for the base LR, :func:`search` for any
space. Importing this package imports optuna; ``import autobatch`` alone does not.
"""

from __future__ import annotations

from autobatch.tune.study import TuneResult, search, tune_lr

__all__ = ["TuneResult", "search", "tune_lr"]
