"""The gradient noise scale estimator: plain maths over floats, no hooks, no devices.

Notation (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"): ``g_i`` is
the gradient of one example's loss, ``G = E[g_i]`` the true gradient, ``Sigma = Cov(g_i)``,
and ``G_b`` the gradient of a *mean-reduced* loss over ``b`` examples, so that

    E|G_b|^2 = |G|^2 + tr(Sigma) / b.

Two batch sizes ``b < B`` measured at the same parameters give unbiased estimates of both
terms (their App. A.1); :func:`two_batch_estimates` computes them. The ratio of two unbiased
estimates is not unbiased, so :class:`GradientNoiseScale` averages the two quantities
*separately* (bias-corrected exponential moving averages) and only then divides:

    B_simple = EMA(tr(Sigma)) / EMA(|G|^2).

Single-step ``|G|^2`` estimates are often negative when B_simple >> B; they go into the
average unclipped (clipping each draw biases it) and only the final average is floored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["GradientNoiseScale", "noise_scale_interval", "two_batch_estimates"]


def two_batch_estimates(
    small_sq_norm: float, small_batch_size: float, big_sq_norm: float, big_batch_size: float
) -> tuple[float, float]:
    """Unbiased one-step estimates of ``|G|^2`` and ``tr(Sigma)`` (McCandlish App. A.1).

    Args:
        small_sq_norm: ``|G_b|^2``, the squared L2 norm of a mean-reduced gradient over
            ``small_batch_size`` examples (or the mean of several such norms, which has the
            same expectation and less spread).
        small_batch_size: ``b``, examples per small batch (1 for per-example norms); may be
            an effective, non-integer size (see :mod:`autobatch._effective_batch`).
        big_sq_norm: ``|G_B|^2`` for the gradient over all ``big_batch_size`` examples.
        big_batch_size: ``B > b``; ``math.inf`` means the big gradient is exact (``|G|^2``).

    Returns:
        ``(grad_sq, trace_cov)``:
        ``(B |G_B|^2 - b |G_b|^2) / (B - b)`` and ``(|G_b|^2 - |G_B|^2) / (1/b - 1/B)``.
        ``grad_sq`` may be negative for one draw; that is expected.

    Raises:
        ValueError: if ``b < 1`` or ``B <= b``.
    """
    b, big = small_batch_size, big_batch_size
    if b < 1 or big <= b:
        raise ValueError(
            "two_batch_estimates needs 1 <= small_batch_size < big_batch_size "
            f"(got small_batch_size={b}, big_batch_size={big}); measure the small-batch "
            "gradients on a strict subset of the big batch"
        )
    trace_cov = (small_sq_norm - big_sq_norm) / (1.0 / b - 1.0 / big)
    # (B|G_B|^2 - b|G_b|^2)/(B-b) rewritten as |G_B|^2 - trace_cov/B, finite for B = inf.
    grad_sq = big_sq_norm - trace_cov / big
    return grad_sq, trace_cov



def noise_scale_interval(
    grad_sq: float, trace_cov: float, grad_sq_stderr: float, trace_cov_stderr: float, z: float = 1.0
) -> tuple[float, float]:
    """A conservative ``z``-sigma interval for ``B_simple = tr(Sigma)/|G|^2``.

    Each bound moves both averages against it by ``z`` standard errors:
    ``low = max(S - z se_S, 0) / (G + z se_G)`` and ``high = (S + z se_S) / (G - z se_G)``
    (infinite once ``G - z se_G <= 0``). Unlike a delta-method error of the ratio, which
    explodes when ``|G|^2`` is small and noisy (exactly when ``B_simple >> B``), the lower
    bound stays informative there: ``|G|^2`` is at most ``G + z se_G``.

    Args:
        grad_sq: averaged ``|G|^2``, unfloored (may be negative).
        trace_cov: averaged ``tr(Sigma)``.
        grad_sq_stderr, trace_cov_stderr: their standard errors (inf if unknown).
        z: width in standard errors (>= 0).

    Returns:
        ``(low, high)`` in examples; ``(0, inf)`` when nothing is known.
    """
    if not all(math.isfinite(v) for v in (grad_sq, trace_cov, grad_sq_stderr, trace_cov_stderr)):
        return 0.0, math.inf
    g_hi = grad_sq + z * grad_sq_stderr
    g_lo = grad_sq - z * grad_sq_stderr
    low = max(trace_cov - z * trace_cov_stderr, 0.0) / g_hi if g_hi > 0 else math.inf
    high = (trace_cov + z * trace_cov_stderr) / g_lo if g_lo > 0 else math.inf
    return low, high

class GradientNoiseScale:
    """Streaming estimate of ``|G|^2``, ``tr(Sigma)`` and ``B_simple = tr(Sigma)/|G|^2``.

    Feed it, once per optimizer step, the squared norms of the step's small-batch gradients
    (all of them: micro-batches, data-parallel ranks' local gradients, or per-example
    gradients) and of the whole step's gradient. All gradients must be of a mean-reduced loss
    (divide sum-reduced norms by the batch size squared first), measured before clipping and
    after removing any AMP loss scale.

    Args:
        smoothing: EMA decay ``beta`` in ``[0, 1)``; the effective memory is about
            ``1/(1-beta)`` steps. ``None`` weighs every update equally (a plain running mean,
            right for a fixed-parameter measurement).
        min_updates: updates needed before :attr:`ready` can be true.
        floor: smallest value reported for ``grad_sq`` (the averaged ``|G|^2`` can be
            negative when the noise dominates); it keeps ``noise_scale`` finite and positive.

    Attributes:
        num_updates: accepted updates.
        num_rejected: updates refused because an input was NaN or infinite.
    """

    def __init__(
        self, smoothing: float | None = 0.95, *, min_updates: int = 3, floor: float = 1e-30
    ) -> None:
        if smoothing is not None and not 0.0 <= smoothing < 1.0:
            raise ValueError(
                f"smoothing must be in [0, 1) or None (got smoothing={smoothing}); "
                "0.95 averages over about 20 steps, None weighs all updates equally"
            )
        if min_updates < 1:
            raise ValueError(f"min_updates must be >= 1 (got min_updates={min_updates})")
        if not floor > 0:
            raise ValueError(f"floor must be > 0 (got floor={floor})")
        self.smoothing = smoothing
        self.min_updates = min_updates
        self.floor = floor
        self.reset()

    def reset(self) -> None:
        """Forget every update (the configuration is kept)."""
        self.num_updates = 0
        self.num_rejected = 0
        # Weighted sums: m_* are the raw (not bias-corrected) averages, w the total weight,
        # q the sum of squared weights (for the effective sample count); the second moments
        # feed the standard error.
        self._w = 0.0
        self._q = 0.0
        self._m_g = 0.0
        self._m_s = 0.0
        self._m_gg = 0.0
        self._m_ss = 0.0
        self._m_gs = 0.0

    # -- updates -----------------------------------------------------------------------------
    def update(
        self,
        small_sq_norms: float | Iterable[float],
        small_batch_size: float,
        big_sq_norm: float,
        big_batch_size: float,
        *,
        steps: int = 1,
    ) -> bool:
        """Add one step's measurement.

        Args:
            small_sq_norms: squared norms of every small-batch gradient of the step (one
                float or an iterable of floats, or a 1-D tensor); their mean is used.
            small_batch_size: examples per small batch, ``b`` (a float for an effective size,
                e.g. ``1/mean(1/b_i)`` for unequal micro-batches).
            big_sq_norm: squared norm of the step's whole gradient.
            big_batch_size: examples in the whole step, ``B > b`` (may be effective too).
            steps: optimizer steps this measurement stands for (the steps since the previous
                update, for a loop that measures only every few steps). The EMA then decays
                by ``smoothing ** steps`` and gives the update the weight
                ``1 - smoothing ** steps``, so its memory stays about ``1/(1-smoothing)``
                *steps*, however sparse the updates. Ignored when ``smoothing`` is None.

        Returns:
            True if the update was accepted, False if it was rejected for a NaN or infinite
            input (counted in :attr:`num_rejected`, never averaged in).

        Raises:
            ValueError: if the batch sizes are not ``1 <= b < B``, no small norm is given,
                or ``steps < 1``.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got steps={steps}); it counts the optimizer "
                             "steps since the previous update")
        smalls = [float(small_sq_norms)] if _is_scalar(small_sq_norms) else [
            float(x) for x in small_sq_norms  # type: ignore[union-attr]
        ]
        if not smalls:
            raise ValueError("small_sq_norms is empty; pass at least one small-batch norm")
        big = float(big_sq_norm)
        if not all(math.isfinite(x) for x in smalls) or not math.isfinite(big):
            self.num_rejected += 1
            return False
        g, s = two_batch_estimates(sum(smalls) / len(smalls), small_batch_size, big, big_batch_size)
        self._add(g, s, steps)
        return True

    def _add(self, g: float, s: float, steps: int = 1) -> None:
        if self.smoothing is None:
            decay, weight = 1.0, 1.0
        else:
            decay = self.smoothing if steps == 1 else self.smoothing**steps
            weight = 1.0 - decay
        self._w = decay * self._w + weight
        self._q = decay * decay * self._q + weight * weight
        self._m_g = decay * self._m_g + weight * g
        self._m_s = decay * self._m_s + weight * s
        self._m_gg = decay * self._m_gg + weight * g * g
        self._m_ss = decay * self._m_ss + weight * s * s
        self._m_gs = decay * self._m_gs + weight * g * s
        self.num_updates += 1

    # -- results -----------------------------------------------------------------------------
    @property
    def grad_sq(self) -> float:
        """Averaged ``|G|^2`` (squared gradient norm of a mean-reduced loss), floored at
        :attr:`floor`; NaN before the first update."""
        if self._w == 0.0:
            return math.nan
        return max(self._m_g / self._w, self.floor)

    @property
    def grad_sq_mean(self) -> float:
        """Averaged ``|G|^2`` without the floor (may be negative); NaN before any update."""
        return math.nan if self._w == 0.0 else self._m_g / self._w

    @property
    def grad_sq_stderr(self) -> float:
        """Standard error of the averaged ``|G|^2`` (inf with fewer than 2 updates)."""
        return self._stderr(self._m_g, self._m_gg)

    @property
    def trace_cov_stderr(self) -> float:
        """Standard error of the averaged ``tr(Sigma)`` (inf with fewer than 2 updates)."""
        return self._stderr(self._m_s, self._m_ss)

    def _stderr(self, first: float, second: float) -> float:
        n = self.effective_samples
        if self.num_updates < 2 or n <= 1.0:
            return math.inf
        mean = first / self._w
        var = max(second / self._w - mean * mean, 0.0) * n / (n - 1.0)
        return math.sqrt(var / n)

    @property
    def trace_cov(self) -> float:
        """Averaged ``tr(Sigma)``: the per-example gradient variance summed over parameters;
        NaN before the first update. Can be slightly negative when the noise is tiny."""
        return math.nan if self._w == 0.0 else self._m_s / self._w

    @property
    def noise_scale(self) -> float:
        """``B_simple = tr(Sigma) / |G|^2`` in examples; NaN before the first update."""
        return self.trace_cov / self.grad_sq

    @property
    def effective_samples(self) -> float:
        """Effective number of independent updates behind the averages,
        ``(sum of weights)^2 / (sum of squared weights)``; equals :attr:`num_updates` when
        ``smoothing`` is None and tends to ``(1+beta)/(1-beta)`` for an EMA."""
        return 0.0 if self._q == 0.0 else self._w * self._w / self._q

    @property
    def noise_scale_stderr(self) -> float:
        """Standard error of :attr:`noise_scale` from the spread of the single-step estimates
        (delta method on the ratio of the two averages); inf with fewer than 2 updates.

        Treats updates as independent; under an EMA that still holds for the weighted means.
        """
        n = self.effective_samples
        if self.num_updates < 2 or n <= 1.0:
            return math.inf
        g_raw, s = self._m_g / self._w, self._m_s / self._w
        if g_raw <= 0.0:
            return math.inf
        # Weighted (co)variances of single-step draws, with the effective-sample correction.
        corr = n / (n - 1.0)
        var_g = max(self._m_gg / self._w - g_raw * g_raw, 0.0) * corr
        var_s = max(self._m_ss / self._w - s * s, 0.0) * corr
        cov = (self._m_gs / self._w - g_raw * s) * corr
        ratio = s / g_raw
        rel_var = (var_s / (s * s) if s != 0.0 else 0.0) + var_g / (g_raw * g_raw)
        rel_var -= 2.0 * cov / (s * g_raw) if s != 0.0 else 0.0
        return abs(ratio) * math.sqrt(max(rel_var, 0.0) / n)

    @property
    def ready(self) -> bool:
        """True once :attr:`min_updates` updates are in and the averaged ``|G|^2`` is
        positive (before that the noise scale is undefined or floored)."""
        return self.num_updates >= self.min_updates and self._m_g > 0.0

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this estimator stands."""
        return {
            "smoothing": self.smoothing,
            "min_updates": self.min_updates,
            "floor": self.floor,
            "num_updates": self.num_updates,
            "num_rejected": self.num_rejected,
            "w": self._w,
            "q": self._q,
            "m_g": self._m_g,
            "m_s": self._m_s,
            "m_gg": self._m_gg,
            "m_ss": self._m_ss,
            "m_gs": self._m_gs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the result is bit-identical to the saved estimator."""
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise KeyError(f"GradientNoiseScale state is missing keys {missing}")
        self.smoothing = state["smoothing"]
        self.min_updates = int(state["min_updates"])
        self.floor = float(state["floor"])
        self.num_updates = int(state["num_updates"])
        self.num_rejected = int(state["num_rejected"])
        for key in ("w", "q", "m_g", "m_s", "m_gg", "m_ss", "m_gs"):
            setattr(self, f"_{key}", float(state[key]))

    def __repr__(self) -> str:
        return (
            f"GradientNoiseScale(noise_scale={self.noise_scale:.4g}, grad_sq={self.grad_sq:.4g}, "
            f"trace_cov={self.trace_cov:.4g}, updates={self.num_updates}, "
            f"rejected={self.num_rejected}, ready={self.ready})"
        )


def _is_scalar(x: object) -> bool:
    if isinstance(x, (int, float)):
        return True
    ndim = getattr(x, "ndim", None)
    return ndim == 0
