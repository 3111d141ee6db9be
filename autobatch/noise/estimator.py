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
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["GradientNoiseScale", "noise_scale_interval", "student_width", "two_batch_estimates"]


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



def student_width(z: float, dof: float) -> float:
    """The half-width, in standard errors, that covers as often as ``+-z`` does for a normal
    estimate, when the standard error is itself estimated from ``dof`` degrees of freedom:
    the Student-t quantile ``t_dof(Phi(z))`` (Cornish-Fisher expansion in ``1/dof``, to
    ``1/dof^4``: within 1% of the exact quantile for ``z <= 2`` and ``dof >= 2``, 0.2% from 3).

    At ``z = 1``: 1.32 for 2 degrees of freedom, 1.14 for 4, 1.03 for 19; ``z`` itself for an
    infinite ``dof``. ``dof`` below 1 counts as 1 (where the expansion is still within 12%).
    """
    if not math.isfinite(dof) or z == 0.0:
        return z
    x, v = z, max(dof, 1.0)
    x2 = x * x
    g1 = x * (x2 + 1.0) / 4.0
    g2 = x * ((5.0 * x2 + 16.0) * x2 + 3.0) / 96.0
    g3 = x * (((3.0 * x2 + 19.0) * x2 + 17.0) * x2 - 15.0) / 384.0
    g4 = x * ((((79.0 * x2 + 776.0) * x2 + 1482.0) * x2 - 1920.0) * x2 - 945.0) / 92160.0
    return x + (g1 + (g2 + (g3 + g4 / v) / v) / v) / v


def noise_scale_interval(
    grad_sq: float, trace_cov: float, grad_sq_stderr: float, trace_cov_stderr: float, z: float = 1.0,
    *, grad_sq_dof: float = math.inf, trace_cov_dof: float = math.inf,
) -> tuple[float, float]:
    """A conservative ``z``-sigma interval for ``B_simple = tr(Sigma)/|G|^2``.

    Each bound moves both averages against it by ``z`` standard errors:
    ``low = max(S - z se_S, 0) / (G + z se_G)`` and ``high = (S + z se_S) / (G - z se_G)``
    (infinite once ``G - z se_G <= 0``). Unlike a delta-method error of the ratio, which
    explodes when ``|G|^2`` is small and noisy (exactly when ``B_simple >> B``), the lower
    bound stays informative there: ``|G|^2`` is at most ``G + z se_G``.

    With the degrees of freedom of the standard errors (``GradientNoiseScale.grad_sq_dof``,
    ``trace_cov_dof``), ``z`` becomes :func:`student_width` for each average, so that an
    average's own interval covers its true value as often as ``z`` promises for a normal
    estimate even when its standard error comes from a handful of effective draws.

    Args:
        grad_sq: averaged ``|G|^2``, unfloored (may be negative).
        trace_cov: averaged ``tr(Sigma)``.
        grad_sq_stderr, trace_cov_stderr: their standard errors (inf if unknown).
        z: width in standard errors (>= 0).
        grad_sq_dof, trace_cov_dof: degrees of freedom of the two standard errors
            (inf: known exactly, ``z`` is used as given).

    Returns:
        ``(low, high)`` in examples; ``(0, inf)`` when nothing is known.
    """
    if not all(math.isfinite(v) for v in (grad_sq, trace_cov, grad_sq_stderr, trace_cov_stderr)):
        return 0.0, math.inf
    g_half = student_width(z, grad_sq_dof) * grad_sq_stderr
    s_half = student_width(z, trace_cov_dof) * trace_cov_stderr
    g_hi = grad_sq + g_half
    g_lo = grad_sq - g_half
    low = max(trace_cov - s_half, 0.0) / g_hi if g_hi > 0 else math.inf
    high = (trace_cov + s_half) / g_lo if g_lo > 0 else math.inf
    return low, high


def _memoized(method: Callable[[GradientNoiseScale], Any]) -> property:
    """A read-only property computed once per state of the estimator: the loop reads the same
    results several times per step (the step's record, the policy's context), and each is a
    few dozen float operations."""
    name = method.__name__

    def getter(self: GradientNoiseScale) -> Any:
        memo = self._memo
        if name not in memo:
            memo[name] = method(self)
        return memo[name]

    getter.__doc__ = method.__doc__
    return property(getter)


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
        self._memo: dict[str, Any] = {}  # results of the current state (see _memoized)
        self.num_updates = 0
        self.num_rejected = 0
        # Two weighted averages, each kept as raw (not bias-corrected) sums m_* with total
        # weight w and sum of squared weights q (for the effective sample count):
        # - the two-batch updates: tr(Sigma) draws s and their paired |G|^2 draws (m_gp);
        # - every |G|^2 draw (weights _wg, _qg): the two-batch ones (m_g, m_gg) and the
        #   big-only ones, |G_B|^2 - tr(Sigma)/B with the tr(Sigma) average at read time, kept
        #   as sums of y = |G_B|^2 and c = 1/B (m_y, m_yy, m_yc, m_c, m_cc).
        # Second moments feed the standard errors.
        self._w = 0.0
        self._q = 0.0
        self._m_s = 0.0
        self._m_ss = 0.0
        self._m_gs = 0.0
        self._m_gp = 0.0
        self._wg = 0.0
        self._qg = 0.0
        self._m_g = 0.0
        self._m_gg = 0.0
        self._m_y = 0.0
        self._m_yy = 0.0
        self._m_yc = 0.0
        self._m_c = 0.0
        self._m_cc = 0.0
        self._q_x = 0.0  # sum over two-batch draws of (their |G|^2 weight x tr(Sigma) weight)
        self._last_pair_step: int | None = None
        self._last_g_step: int | None = None

    # -- updates -----------------------------------------------------------------------------
    def update(
        self,
        small_sq_norms: float | Iterable[float],
        small_batch_size: float,
        big_sq_norm: float,
        big_batch_size: float,
        *,
        step: int | None = None,
    ) -> bool:
        """Add one step's two-batch measurement.

        Args:
            small_sq_norms: squared norms of every small-batch gradient of the step (one
                float or an iterable of floats, or a 1-D tensor); their mean is used.
            small_batch_size: examples per small batch, ``b`` (a float for an effective size,
                e.g. ``1/mean(1/b_i)`` for unequal micro-batches).
            big_sq_norm: squared norm of the step's whole gradient.
            big_batch_size: examples in the whole step, ``B > b`` (may be effective too).
            step: the optimizer step this was measured at, for a loop that measures only
                some steps. The averages then decay by ``smoothing`` per step elapsed since
                their previous update and give this one the weight
                ``1 - smoothing ** elapsed``, so their memory stays about ``1/(1-smoothing)``
                *steps* however sparse the updates. None: one step after the previous update.

        Returns:
            True if the update was accepted, False if it was rejected for a NaN or infinite
            input (counted in :attr:`num_rejected`, never averaged in).

        Raises:
            ValueError: if the batch sizes are not ``1 <= b < B``, no small norm is given,
                or ``step`` is not after the previous update's.
        """
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
        decay, weight = self._decay(step, self._last_pair_step)
        decay_g, weight_g = self._decay(step, self._last_g_step)
        self._q_x *= decay
        self._w = decay * self._w + weight
        self._q = decay * decay * self._q + weight * weight
        self._m_s = decay * self._m_s + weight * s
        self._m_ss = decay * self._m_ss + weight * s * s
        self._m_gs = decay * self._m_gs + weight * g * s
        self._m_gp = decay * self._m_gp + weight * g
        self._decay_grad_sq(decay_g, step)
        self._q_x += weight * weight_g
        self._wg += weight_g
        self._qg += weight_g * weight_g
        self._m_g += weight_g * g
        self._m_gg += weight_g * g * g
        self._last_pair_step = step
        self.num_updates += 1
        self._memo.clear()
        return True

    def update_big(self, big_sq_norm: float, big_batch_size: float, *, step: int | None = None) -> bool:
        """Add a step that measured only its whole gradient (no small batches).

        ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``, so with the current ``tr(Sigma)`` average the step
        gives one more ``|G|^2`` draw, ``|G_B|^2 - tr(Sigma)/B``, at the cost of one norm: a
        loop that splits only every k-th step for the small batches still averages ``|G|^2``,
        the noisier of the two when ``B_simple >> B``, over every step. The standard errors
        count the shared ``tr(Sigma)`` average's own error in these draws, and its covariance
        with the two-batch steps' own ``|G|^2`` draws.

        Args:
            big_sq_norm: squared norm of the step's gradient (mean-reduced loss, unscaled).
            big_batch_size: examples in the step, ``B``.
            step: as in :meth:`update`.

        Returns:
            True if accepted; False before the first two-batch update (no ``tr(Sigma)`` yet)
            or for a NaN or infinite norm (counted in :attr:`num_rejected`).
        """
        big = float(big_sq_norm)
        if not math.isfinite(big):
            self.num_rejected += 1
            return False
        if self._w == 0.0:
            return False
        inv = 1.0 / big_batch_size
        decay, weight = self._decay(step, self._last_g_step)
        self._decay_grad_sq(decay, step)
        self._wg += weight
        self._qg += weight * weight
        self._m_y += weight * big
        self._m_yy += weight * big * big
        self._m_yc += weight * big * inv
        self._m_c += weight * inv
        self._m_cc += weight * inv * inv
        self._memo.clear()
        return True

    def _decay(self, step: int | None, last: int | None) -> tuple[float, float]:
        """``(decay, weight)`` of an update ``step - last`` steps after the previous one."""
        if self.smoothing is None:
            return 1.0, 1.0
        elapsed = 1 if step is None or last is None else step - last
        if elapsed < 1:
            raise ValueError(
                f"step must be after the previous update's (got step={step} after {last}); "
                "pass the optimizer step count, which only grows"
            )
        decay = self.smoothing if elapsed == 1 else self.smoothing**elapsed
        return decay, 1.0 - decay

    def _decay_grad_sq(self, decay: float, step: int | None) -> None:
        """Decay every |G|^2 sum by ``decay`` for a new draw at ``step``."""
        self._wg *= decay
        self._qg *= decay * decay
        self._q_x *= decay
        for key in ("_m_g", "_m_gg", "_m_y", "_m_yy", "_m_yc", "_m_c", "_m_cc"):
            setattr(self, key, decay * getattr(self, key))
        self._last_g_step = step

    # -- results -----------------------------------------------------------------------------
    @property
    def grad_sq(self) -> float:
        """Averaged ``|G|^2`` (squared gradient norm of a mean-reduced loss), floored at
        :attr:`floor`; NaN before the first update."""
        if self._wg == 0.0:
            return math.nan
        return max(self.grad_sq_mean, self.floor)

    @_memoized
    def grad_sq_mean(self) -> float:
        """Averaged ``|G|^2`` without the floor (may be negative); NaN before any update."""
        if self._wg == 0.0:
            return math.nan
        if self._m_c == 0.0:  # two-batch draws only
            return self._m_g / self._wg
        return (self._m_g + self._m_y - self.trace_cov * self._m_c) / self._wg

    @_memoized
    def grad_sq_stderr(self) -> float:
        """Standard error of the averaged ``|G|^2`` (inf with fewer than 2 updates)."""
        var = self._var_grad_sq()
        return math.inf if var is None else math.sqrt(var)

    @_memoized
    def trace_cov_stderr(self) -> float:
        """Standard error of the averaged ``tr(Sigma)`` (inf with fewer than 2 updates)."""
        var = self._var_trace_cov()
        return math.inf if var is None else math.sqrt(var)

    @_memoized
    def trace_cov_dof(self) -> float:
        """Degrees of freedom of :attr:`trace_cov_stderr`: :attr:`effective_samples` - 1 (the
        spread of that many effective draws estimates it); 0 before 2 updates."""
        return max(self.effective_samples - 1.0, 0.0)

    @_memoized
    def grad_sq_dof(self) -> float:
        """Degrees of freedom of :attr:`grad_sq_stderr` (Welch-Satterthwaite): its variance is
        the spread of every ``|G|^2`` draw (effective count minus 1) plus, with big-only steps,
        the ``tr(Sigma)`` average's share (:attr:`trace_cov_dof`); 0 before 2 updates."""
        parts = self._grad_sq_var_parts
        if parts is None:
            return 0.0
        spread, shared, n_g = parts
        dof_s = self.trace_cov_dof
        if shared <= 0.0 or dof_s <= 0.0:
            return n_g - 1.0
        return (spread + shared) ** 2 / (spread * spread / (n_g - 1.0) + shared * shared / dof_s)

    @staticmethod
    def _spread(first: float, second: float, w: float, q: float) -> tuple[float, float] | None:
        """``(variance of one draw, effective draws)`` of a weighted average, with the
        effective-sample correction; None with too few draws."""
        n = 0.0 if q == 0.0 else w * w / q
        if n <= 1.0:
            return None
        mean = first / w
        return max(second / w - mean * mean, 0.0) * n / (n - 1.0), n

    def _var_trace_cov(self) -> float | None:
        if self.num_updates < 2:
            return None
        spread = self._spread(self._m_s, self._m_ss, self._w, self._q)
        return None if spread is None else spread[0] / spread[1]

    def _var_grad_sq(self) -> float | None:
        parts = self._grad_sq_var_parts
        return None if parts is None else max(parts[0] + parts[1], 0.0)

    @_memoized
    def _grad_sq_var_parts(self) -> tuple[float, float, float] | None:
        """``(spread, shared, n)``: the variance of the ``|G|^2`` average as the draws' spread
        over their ``n`` effective draws plus the share of the ``tr(Sigma)`` average that the
        big-only draws subtract; None with fewer than 2 updates."""
        if self.num_updates < 2:
            return None
        first, second = self._m_g, self._m_gg
        if self._m_c != 0.0:  # add the big-only draws y - S c, S the tr(Sigma) average
            s = self.trace_cov
            first += self._m_y - s * self._m_c
            second += self._m_yy - 2.0 * s * self._m_yc + s * s * self._m_cc
        spread = self._spread(first, second, self._wg, self._qg)
        var_s = self._var_trace_cov()
        if spread is None or var_s is None:
            return None
        # The average is A - c S: A the weighted draws (their spread), c the weight of the
        # big-only draws' shared -tr(Sigma)/B term, S the tr(Sigma) average. S is made of the
        # two-batch steps' tr(Sigma) draws, which are correlated with those same steps' |G|^2
        # draws in A (both come from the step's norms): Var = Var(A) + c^2 Var(S) - 2c Cov(A, S).
        c = self._m_c / self._wg
        shared = c * c * var_s - 2.0 * c * self._pair_cov() if c != 0.0 else 0.0
        return spread[0] / spread[1], shared, spread[1]

    def _pair_cov(self) -> float:
        """Covariance of the two-batch steps' share of the ``|G|^2`` average with the
        ``tr(Sigma)`` average: the paired draws' covariance, weighted by both averages'
        weights (``_q_x``). Needs at least 2 effective two-batch updates."""
        n = self.effective_samples
        cov_draw = (self._m_gs / self._w - self._m_gp / self._w * (self._m_s / self._w)) * n / (n - 1.0)
        return cov_draw * self._q_x / (self._w * self._wg)

    @_memoized
    def trace_cov(self) -> float:
        """Averaged ``tr(Sigma)``: the per-example gradient variance summed over parameters;
        NaN before the first update. Can be slightly negative when the noise is tiny."""
        return math.nan if self._w == 0.0 else self._m_s / self._w

    @property
    def noise_scale(self) -> float:
        """``B_simple = tr(Sigma) / |G|^2`` in examples; NaN before the first update."""
        return self.trace_cov / self.grad_sq

    @_memoized
    def effective_samples(self) -> float:
        """Effective number of independent two-batch updates behind the averages,
        ``(sum of weights)^2 / (sum of squared weights)``; equals :attr:`num_updates` when
        ``smoothing`` is None and tends to ``(1+beta)/(1-beta)`` for an EMA of every step."""
        return 0.0 if self._q == 0.0 else self._w * self._w / self._q

    @_memoized
    def noise_scale_stderr(self) -> float:
        """Standard error of :attr:`noise_scale` from the spread of the single-step estimates
        (delta method on the ratio of the two averages); inf with fewer than 2 updates.

        Treats updates as independent; under an EMA that still holds for the weighted means.
        """
        var_g, var_s = self._var_grad_sq(), self._var_trace_cov()
        if var_g is None or var_s is None:
            return math.inf
        g_raw, s = self.grad_sq_mean, self._m_s / self._w
        if g_raw <= 0.0:
            return math.inf
        # Covariance of the two averages: the paired draws of the two-batch updates (weighted
        # by both averages' weights), less the big-only draws' -tr(Sigma)/B term, which moves
        # against the tr(Sigma) average.
        cov = self._pair_cov() - self._m_c / self._wg * var_s
        ratio = s / g_raw
        rel_var = (var_s / (s * s) if s != 0.0 else 0.0) + var_g / (g_raw * g_raw)
        rel_var -= 2.0 * cov / (s * g_raw) if s != 0.0 else 0.0
        return abs(ratio) * math.sqrt(max(rel_var, 0.0))

    @property
    def ready(self) -> bool:
        """True once :attr:`min_updates` updates are in and the averaged ``|G|^2`` is
        positive (before that the noise scale is undefined or floored)."""
        return self.num_updates >= self.min_updates and self.grad_sq_mean > 0.0

    # -- persistence -------------------------------------------------------------------------
    _REQUIRED = ("smoothing", "min_updates", "floor", "num_updates", "num_rejected", "w", "q",
                 "m_g", "m_s", "m_gg", "m_ss", "m_gs", "m_gp", "wg", "qg", "m_y", "m_yy", "m_yc", "m_c",
                 "m_cc", "q_x", "last_pair_step", "last_g_step")

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
            "m_gp": self._m_gp,
            "wg": self._wg,
            "qg": self._qg,
            "m_y": self._m_y,
            "m_yy": self._m_yy,
            "m_yc": self._m_yc,
            "m_c": self._m_c,
            "m_cc": self._m_cc,
            "q_x": self._q_x,
            "last_pair_step": self._last_pair_step,
            "last_g_step": self._last_g_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the result is bit-identical to the saved estimator."""
        missing = sorted(set(self._REQUIRED) - set(state))
        if missing:
            raise KeyError(f"GradientNoiseScale state is missing keys {missing}")
        self.smoothing = state["smoothing"]
        self.min_updates = int(state["min_updates"])
        self.floor = float(state["floor"])
        self.num_updates = int(state["num_updates"])
        self.num_rejected = int(state["num_rejected"])
        for key in ("w", "q", "m_g", "m_s", "m_gg", "m_ss", "m_gs"):
            setattr(self, f"_{key}", float(state[key]))
        for key in ("m_gp", "wg", "qg", "m_y", "m_yy", "m_yc", "m_c", "m_cc", "q_x"):
            setattr(self, f"_{key}", float(state[key]))
        self._last_pair_step = state["last_pair_step"]
        self._last_g_step = state["last_g_step"]
        self._memo.clear()

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
