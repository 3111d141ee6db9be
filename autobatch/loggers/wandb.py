"""Weights & Biases (``pip install "torch-autobatch[wandb]"``): the run's figures in a W&B run;
``WANDB_MODE=offline`` keeps them on disk for ``wandb sync``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autobatch.loggers.base import Logger

__all__ = ["WandbLogger"]


class WandbLogger(Logger):
    """Logs into the active W&B run (``wandb.run``), or one it starts with ``wandb.init``.

    A ``run.log`` call costs about a millisecond (more than a small model's step), so on short
    steps this logger writes every so many steps within ``max_overhead`` (1% of the run's
    time); evaluations and the last step are always written.

    Args:
        log_dir: ``wandb.init``'s ``dir`` (where W&B keeps its files; created).
        append: unused; accepted so that every named logger is built alike.
        run: a W&B run of your own to log into (left open at the end).
        **init: further ``wandb.init`` arguments (``project``, ``name``, ``config``, ``mode``, ...).

    Raises:
        ImportError: without the ``wandb`` package, naming the extra that installs it.
    """

    def __init__(self, log_dir: str | Path | None = None, *, append: bool = False, run: Any = None,
                 **init: Any) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError('the wandb logger needs the wandb package: pip install "torch-autobatch[wandb]" '
                              "(or pip install wandb)") from err
        self._owns = run is None and wandb.run is None
        if run is None and wandb.run is None:
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                init.setdefault("dir", str(log_dir))
            run = wandb.init(**init)
        self.run = run if run is not None else wandb.run

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._owns:
            self.run.finish()
