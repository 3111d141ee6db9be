"""Learning-rate scaling rules: the LR at batch size ``B`` from a base LR tuned at ``B0``.

A rule returns a factor, and the training loop uses ``LR(B) = base_lr * factor``. Batch sizes
are global (examples per optimizer step); ``grad_sq = |G|^2`` and ``trace_cov = tr(Sigma)``
are the gradient noise scale estimator's averages for a *mean-reduced* loss (see
:mod:`autobatch.noise.estimator`), ``B_noise = trace_cov / grad_sq``.

The rules (:mod:`~autobatch.scaling.rules`, named as in :data:`autobatch.registry.LR_SCALINGS`;
their maths is plain functions in :mod:`~autobatch.scaling.base`):

- ``linear`` (Goyal et al. 2017): ``B / B0``, for SGD below the critical batch size.
- ``sqrt`` (Malladi et al. 2022): ``sqrt(B / B0)``, for Adam-family optimizers.
- ``adascale`` (Johnson et al. 2020): the gain ``r = (s2 + m2) / (s2/S + m2)`` with
  ``s2 = tr(Sigma)/B0``, ``m2 = |G|^2``, ``S = B/B0``. It lies between 1 and ``S`` and equals
  ``eps_opt(B) / eps_opt(B0)`` in McCandlish et al.'s (2018) model.
- ``none``: 1.

The LR cannot keep growing past the critical batch size: ``eps_opt(B)`` saturates at
``eps_max``, so ``eps_opt(B) / eps_opt(B0)`` never exceeds ``1 + B_noise/B0`` (the limit of the
AdaScale gain as ``S`` grows). ``linear`` and ``sqrt`` therefore cap their factor there when the
noise scale is known (``cap_at_noise_scale=True``, the default); on MNIST-1D with plain SGD
the uncapped linear rule diverged once ``B`` passed ~4x ``B0`` (docs/design/gns.md). A rule
that reads the noise holds the last usable estimate while the estimate is lost.
"""

from __future__ import annotations

from autobatch.scaling.base import (
    LRScaling,
    adascale_gain,
    linear_factor,
    noise_cap,
    sqrt_factor,
)
from autobatch.scaling.rules import (
    AdaScaleScaling,
    LinearScaling,
    NoScaling,
    SqrtScaling,
    default_scaling,
)

__all__ = [
    "AdaScaleScaling",
    "LRScaling",
    "LinearScaling",
    "NoScaling",
    "SqrtScaling",
    "adascale_gain",
    "default_scaling",
    "linear_factor",
    "noise_cap",
    "sqrt_factor",
]
