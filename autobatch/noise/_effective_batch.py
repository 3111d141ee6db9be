"""Effective batch sizes that keep the two-batch estimator unbiased (plain maths).

The estimator in :mod:`autobatch.noise.estimator` assumes ``E|G_b|^2 = |G|^2 + tr(Sigma)/b``. Two common
departures keep that form exactly once ``b`` is replaced by an effective (non-integer) size:

- micro-batches of unequal sizes ``b_i``: the mean of their squared norms has expectation
  ``|G|^2 + tr(Sigma) * mean(1/b_i)``, so ``b_eff = 1 / mean(1/b_i)`` (the harmonic mean);
- a batch drawn *without replacement* from a finite set of ``N`` examples: the variance of its
  mean is ``Sigma/b * (N-b)/(N-1)`` (the finite-population correction), and
  ``b' = b (N-1)/(N-b)`` makes the estimator unbiased for the population ``|G|^2`` and
  ``tr(Sigma)`` of those ``N`` examples (``Sigma`` with the ``1/N`` convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["harmonic_batch_size", "without_replacement_batch_size"]


def harmonic_batch_size(sizes: Sequence[float]) -> float:
    """``1 / mean(1/b_i)``: the batch size that makes the mean squared norm of unequal
    micro-batches an unbiased two-batch input; equals ``b`` when every ``b_i == b``.

    Raises:
        ValueError: if ``sizes`` is empty or holds a size < 1.
    """
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch sizes must be a non-empty list of values >= 1 (got {list(sizes)})")
    return len(sizes) / sum(1.0 / b for b in sizes)


def without_replacement_batch_size(batch_size: float, population: int) -> float:
    """Effective size of a batch of ``batch_size`` examples drawn without replacement from
    ``population`` examples: ``b (N-1)/(N-b)``; ``inf`` when the batch is the whole set
    (its mean gradient is then exact).

    With ``E|G_b|^2 = |G|^2 + tr(Sigma)/b * (N-b)/(N-1)`` rewritten as
    ``(|G|^2 - tr(Sigma)/(N-1)) + (tr(Sigma) N/(N-1)) / b``, substituting ``b'`` for ``b`` (and
    likewise for the big batch) turns the two-batch formulas into unbiased estimates of the
    population ``|G|^2`` and ``tr(Sigma)``.

    Raises:
        ValueError: if not ``1 <= batch_size <= population``.
    """
    if not 1 <= batch_size <= population:
        raise ValueError(
            "without_replacement_batch_size needs 1 <= batch_size <= population "
            f"(got batch_size={batch_size}, population={population})"
        )
    if batch_size == population:
        return math.inf
    return batch_size * (population - 1) / (population - batch_size)
