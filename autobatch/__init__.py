"""autobatch: pick the batch size of a PyTorch training run automatically, and keep re-picking it.

The public surface is small; everything else lives in private or submodule-level names.
"""

from __future__ import annotations

from autobatch._version import __version__
from autobatch.callbacks import Callback, StopAtTarget, StopTraining
from autobatch.config import FitConfig
from autobatch.evaluate import evaluate
from autobatch.fit import fit
from autobatch.gns import GradientNoiseScale, two_batch_estimates
from autobatch.grad_norms import MicroBatchGradNorms
from autobatch.lr_scaling import AdaScaleScaling, LinearScaling, LRScaling, NoScaling, SqrtScaling
from autobatch.measure import NoiseScaleEstimate, measure_noise_scale
from autobatch.memory import MemoryProbe, probe_memory
from autobatch.per_example import PerExampleGradNorms
from autobatch.policies import BatchSizePolicy, FixedPolicy, GNSPolicy, GoodputPolicy, RampPolicy
from autobatch.results import FitResult, StepRecord
from autobatch.tune import TuneResult, search, tune_lr

__all__ = [
    "AdaScaleScaling",
    "BatchSizePolicy",
    "Callback",
    "FitConfig",
    "FitResult",
    "FixedPolicy",
    "GNSPolicy",
    "GoodputPolicy",
    "GradientNoiseScale",
    "LRScaling",
    "LinearScaling",
    "MemoryProbe",
    "MicroBatchGradNorms",
    "NoScaling",
    "NoiseScaleEstimate",
    "PerExampleGradNorms",
    "RampPolicy",
    "SqrtScaling",
    "StepRecord",
    "StopAtTarget",
    "StopTraining",
    "TuneResult",
    "__version__",
    "evaluate",
    "fit",
    "measure_noise_scale",
    "probe_memory",
    "search",
    "tune_lr",
    "two_batch_estimates",
]
