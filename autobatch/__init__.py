"""autobatch: pick the batch size of a PyTorch training run automatically, and keep re-picking it.

The top level holds the entry points, their configs and results. The parts live in
subpackages: :mod:`autobatch.noise` (the noise-scale estimator and collectors),
:mod:`autobatch.policies` (batch-size policies), :mod:`autobatch.scaling` (LR rules),
:mod:`autobatch.memory` (the probe and OOM handling), :mod:`autobatch.train` (the loop and the
custom-loop kit), :mod:`autobatch.loggers` (a run's figures to TensorBoard, W&B, MLflow, files),
:mod:`autobatch.tune` (Optuna studies), :mod:`autobatch.problems` (built-in problems). The study
entry points are imported on first use, so ``import autobatch`` does not import optuna.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autobatch._version import __version__
from autobatch.api import fit
from autobatch.config import FitConfig
from autobatch.memory.probe import MemoryProbeResult, probe_memory
from autobatch.noise.estimator import GradientNoiseScale
from autobatch.noise.measure import NoiseScaleEstimate, measure_noise_scale
from autobatch.train.callbacks import Callback, StopAtTarget, StopTraining
from autobatch.train.results import FitResult, StepRecord

if TYPE_CHECKING:
    from autobatch.tune.study import TuneResult, search, tune_lr

# name -> module, imported when the name is first used (optuna is heavy; most runs never tune)
_LAZY = {"tune_lr": "autobatch.tune.study", "search": "autobatch.tune.study", "TuneResult": "autobatch.tune.study"}

__all__ = [
    "Callback",
    "FitConfig",
    "FitResult",
    "GradientNoiseScale",
    "MemoryProbeResult",
    "NoiseScaleEstimate",
    "StepRecord",
    "StopAtTarget",
    "StopTraining",
    "TuneResult",
    "__version__",
    "fit",
    "measure_noise_scale",
    "probe_memory",
    "search",
    "tune_lr",
]



def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autobatch' has no attribute {name!r}")
