"""autobatch: pick the batch size of a PyTorch training run automatically, and keep re-picking it.

The top level holds the entry points, their configs and results. The parts live in
subpackages: :mod:`autobatch.noise` (the noise-scale estimator and collectors),
:mod:`autobatch.policies` (batch-size policies), :mod:`autobatch.scaling` (LR rules),
:mod:`autobatch.memory` (the probe and OOM handling), :mod:`autobatch.train` (the loop and the
custom-loop kit), :mod:`autobatch.tune` (Optuna studies), :mod:`autobatch.problems` (built-in
problems). The study entry points are imported on first use, so ``import autobatch`` does not
import optuna.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autobatch._version import __version__
from autobatch.config import FitConfig
from autobatch.memory.probe import MemoryProbeResult, probe_memory
from autobatch.noise.estimator import GradientNoiseScale
from autobatch.noise.measure import NoiseScaleEstimate, measure_noise_scale
from autobatch.train.callbacks import Callback, StopAtTarget, StopTraining
from autobatch.train.fit import fit
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


# Names exported at the top level before 0.2, now in their subpackages; they keep working
# for one release with a DeprecationWarning naming the new home.
_MOVED = {
    "two_batch_estimates": "autobatch.noise", "evaluate": "autobatch.train",
    "LRScaling": "autobatch.scaling", "LinearScaling": "autobatch.scaling",
    "SqrtScaling": "autobatch.scaling", "AdaScaleScaling": "autobatch.scaling",
    "NoScaling": "autobatch.scaling", "BatchSizePolicy": "autobatch.policies",
    "FixedPolicy": "autobatch.policies", "GNSPolicy": "autobatch.policies",
    "GoodputPolicy": "autobatch.policies", "RampPolicy": "autobatch.policies",
}
# Renamed in 0.2 (old top-level name -> new home and name).
_RENAMED = {
    "MicroBatchGradNorms": ("autobatch.noise", "MicroBatchNormCollector"),
    "PerExampleGradNorms": ("autobatch.noise", "PerExampleNormCollector"),
    "MemoryProbe": ("autobatch", "MemoryProbeResult"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _RENAMED:
        from autobatch._deprecation import renamed

        module, new = _RENAMED[name]
        return renamed(module, name, new, getattr(importlib.import_module(module), new))
    if name in _MOVED:
        import warnings

        warnings.warn(
            f"autobatch.{name} moved to {_MOVED[name]}.{name}; import it from there "
            "(the top-level name goes away in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'autobatch' has no attribute {name!r}")
