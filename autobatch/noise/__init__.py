"""The gradient noise scale: the estimator maths, the collectors that read norms off backward,
and a one-off measurement.

- :mod:`~autobatch.noise.estimator`: :class:`GradientNoiseScale` (pure maths over floats).
- :mod:`~autobatch.noise.micro_batch`: per-micro-batch squared norms from gradient hooks.
- :mod:`~autobatch.noise.per_example`: exact per-example squared norms from one backward.
- :mod:`~autobatch.noise.measure`: :func:`measure_noise_scale` at fixed parameters.
"""

from __future__ import annotations

from autobatch.noise.estimator import GradientNoiseScale, noise_scale_interval, student_width, two_batch_estimates
from autobatch.noise.measure import NoiseScaleEstimate, measure_noise_scale
from autobatch.noise.micro_batch import MicroBatchNormCollector, StepGradNorms
from autobatch.noise.per_example import PerExampleNormCollector

__all__ = [
    "GradientNoiseScale",
    "MicroBatchNormCollector",
    "NoiseScaleEstimate",
    "PerExampleNormCollector",
    "StepGradNorms",
    "measure_noise_scale",
    "noise_scale_interval",
    "student_width",
    "two_batch_estimates",
]
