"""Loggers: a run's figures, under stable names, in TensorBoard, W&B, MLflow or plain files.

``fit(..., loggers=["tensorboard", "jsonl"], log_dir="runs/a")`` names them (the names of
:data:`autobatch.registry.LOGGERS`); an instance of a :class:`Logger` subclass (one method,
``log(metrics, step)``) can stand in any list. One module per writer:

- :mod:`~autobatch.loggers.base`: the base class and the names (:data:`STEP_KEYS`);
- :mod:`~autobatch.loggers.files`: ``jsonl`` and ``csv``, nothing to install;
- :mod:`~autobatch.loggers.tensorboard`, :mod:`~autobatch.loggers.wandb`,
  :mod:`~autobatch.loggers.mlflow`: each imports its package when built.
"""

from __future__ import annotations

from autobatch.loggers.base import STEP_KEYS, Logger, eval_metrics, probe_metrics, step_metrics
from autobatch.loggers.files import CSVLogger, JSONLLogger

__all__ = ["STEP_KEYS", "CSVLogger", "JSONLLogger", "Logger", "eval_metrics", "probe_metrics", "step_metrics"]


def __getattr__(name: str):
    # the writers of other packages, imported when asked for (their packages only when built)
    lazy = {"TensorBoardLogger": "tensorboard", "WandbLogger": "wandb", "MLflowLogger": "mlflow"}
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f"autobatch.loggers.{lazy[name]}"), name)
    raise AttributeError(f"module 'autobatch.loggers' has no attribute {name!r}")
