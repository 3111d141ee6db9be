"""The estimator maths on inputs whose answer is known in closed form."""

import math

import numpy as np
import pytest

from autobatch.noise import GradientNoiseScale, noise_scale_interval, student_width, two_batch_estimates


def test_two_batch_estimates_recover_exact_expectations() -> None:
    # E|G_b|^2 = |G|^2 + tr(Sigma)/b: feeding the expectations must return the true values.
    g2, tr = 3.0, 120.0
    for b, big in [(1, 2), (4, 64), (16, 17), (32, 1024)]:
        est_g, est_s = two_batch_estimates(g2 + tr / b, b, g2 + tr / big, big)
        assert est_g == pytest.approx(g2, rel=1e-12)
        assert est_s == pytest.approx(tr, rel=1e-12)


@pytest.mark.parametrize("b,big", [(0, 4), (4, 4), (8, 4)])
def test_two_batch_estimates_rejects_bad_sizes(b: int, big: int) -> None:
    with pytest.raises(ValueError, match=rf"small_batch_size={b}, big_batch_size={big}"):
        two_batch_estimates(1.0, b, 1.0, big)


def _simulate(rng, mean, std, b, k):
    """k micro-batches of b Gaussian per-example gradients; returns their squared norms and
    the squared norm of the whole step's mean gradient."""
    g = mean + std * rng.standard_normal((k, b, mean.size))
    micro = g.mean(axis=1)
    return (micro**2).sum(axis=1), float((micro.mean(axis=0) ** 2).sum())


@pytest.mark.parametrize("ratio", [0.5, 2.0, 4.0])
def test_noise_scale_matches_closed_form(ratio: float) -> None:
    # Per-example gradients ~ N(G, s^2 I): tr(Sigma) = d s^2, so B_simple = d s^2/|G|^2.
    rng = np.random.default_rng(0)
    d, b, k = 50, 8, 8
    big = b * k
    mean = np.full(d, 1.0)
    std = math.sqrt(ratio * big * float(mean @ mean) / d)
    exact = d * std**2 / float(mean @ mean)
    est = GradientNoiseScale(smoothing=None)
    for _ in range(2000):
        smalls, big_sq = _simulate(rng, mean, std, b, k)
        assert est.update(smalls, b, big_sq, big)
    assert est.noise_scale == pytest.approx(exact, rel=0.05)
    assert est.trace_cov == pytest.approx(d * std**2, rel=0.03)
    assert est.ready


def test_stderr_matches_spread_over_repeats() -> None:
    rng = np.random.default_rng(1)
    d, b, k = 20, 4, 4
    mean = np.ones(d)
    std = math.sqrt(2.0 * b * k / d)
    values, errors = [], []
    for _ in range(60):
        est = GradientNoiseScale(smoothing=None)
        for _ in range(100):
            smalls, big_sq = _simulate(rng, mean, std, b, k)
            est.update(smalls, b, big_sq, b * k)
        values.append(est.noise_scale)
        errors.append(est.noise_scale_stderr)
    spread = float(np.std(values))
    assert np.median(errors) == pytest.approx(spread, rel=0.35)


def test_negative_draws_are_averaged_and_only_the_result_is_floored() -> None:
    est = GradientNoiseScale(smoothing=None, floor=1e-6)
    # One draw with |G|^2 estimate -1, one with +3: the mean (1) must count the negative one.
    for g in (-1.0, 3.0):
        tr = 10.0
        assert est.update(g + tr / 1, 1, g + tr / 2, 2)
    assert est.grad_sq == pytest.approx(1.0)
    assert est.noise_scale == pytest.approx(10.0)
    # All-negative average: floored, noise scale stays finite and positive, not ready.
    neg = GradientNoiseScale(smoothing=None, floor=1e-6, min_updates=1)
    neg.update(-5.0 + 10.0, 1, -5.0 + 5.0, 2)
    assert neg.grad_sq == 1e-6
    assert neg.noise_scale > 0 and math.isfinite(neg.noise_scale)
    assert not neg.ready


def test_ema_is_bias_corrected_and_tracks_recent_values() -> None:
    est = GradientNoiseScale(smoothing=0.9, min_updates=1)
    est.update(2.0 + 4.0, 1, 2.0 + 2.0, 2)  # |G|^2 = 2, tr = 4
    assert est.grad_sq == pytest.approx(2.0)  # no pull toward the zero start
    assert est.trace_cov == pytest.approx(4.0)
    for _ in range(200):
        est.update(1.0 + 40.0, 1, 1.0 + 20.0, 2)  # |G|^2 = 1, tr = 40
    assert est.noise_scale == pytest.approx(40.0, rel=1e-6)
    assert est.effective_samples == pytest.approx((1 + 0.9) / (1 - 0.9), rel=1e-3)


def test_non_finite_inputs_are_rejected_and_counted() -> None:
    est = GradientNoiseScale(smoothing=None)
    est.update([5.0, 7.0], 1, 4.0, 2)
    before = est.state_dict()
    assert not est.update([float("nan"), 1.0], 1, 1.0, 2)
    assert not est.update(1.0, 1, float("inf"), 2)
    assert est.num_rejected == 2
    after = est.state_dict()
    assert {k: v for k, v in after.items() if k != "num_rejected"} == {
        k: v for k, v in before.items() if k != "num_rejected"
    }


def test_state_dict_round_trip_is_exact_and_reset_forgets() -> None:
    rng = np.random.default_rng(2)
    est = GradientNoiseScale(smoothing=0.97)
    for _ in range(30):
        est.update(list(rng.uniform(2, 3, size=4)), 4, float(rng.uniform(1, 2)), 16)
    copy = GradientNoiseScale()
    copy.load_state_dict(est.state_dict())
    assert copy.state_dict() == est.state_dict()
    for _ in range(5):
        args = (list(rng.uniform(2, 3, size=4)), 4, float(rng.uniform(1, 2)), 16)
        est.update(*args)
        copy.update(*args)
    assert copy.noise_scale == est.noise_scale and copy.noise_scale_stderr == est.noise_scale_stderr
    est.reset()
    assert est.num_updates == 0 and math.isnan(est.noise_scale) and not est.ready
    with pytest.raises(KeyError, match="missing keys"):
        copy.load_state_dict({"smoothing": 0.9})


@pytest.mark.parametrize(
    "kwargs,match",
    [({"smoothing": 1.0}, "smoothing=1.0"), ({"min_updates": 0}, "min_updates=0"), ({"floor": 0.0}, "floor=0.0")],
)
def test_bad_configuration_is_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradientNoiseScale(**kwargs)


def test_an_update_standing_for_several_steps_equals_repeating_it() -> None:
    # An EMA update k steps after the previous one (decay beta^k, weight 1-beta^k) must average
    # exactly like the same measurement fed at each of those k steps: the window stays in
    # steps however sparse the updates.
    sparse, dense = GradientNoiseScale(0.9), GradientNoiseScale(0.9)
    for small, big, step, k in [(5.0, 2.0, 0, 1), (7.0, 1.5, 3, 3), (4.0, 2.5, 11, 8)]:
        sparse.update([small], 4, big, 16, step=step)
        for _ in range(k):
            dense.update([small], 4, big, 16)
    assert sparse.grad_sq == pytest.approx(dense.grad_sq, rel=1e-12)
    assert sparse.trace_cov == pytest.approx(dense.trace_cov, rel=1e-12)
    assert sparse.num_updates == 3
    with pytest.raises(ValueError, match="step must be after the previous update's"):
        sparse.update([1.0], 4, 1.0, 16, step=11)


def test_big_only_steps_recover_exact_inputs() -> None:
    # Noise-free inputs, |G|^2 = 2 and tr(Sigma) = 48: E|G_b|^2 = 2 + 48/b exactly. Two-batch
    # updates every 4th step, whole-step norms in between (at varying B): both averages exact.
    est = GradientNoiseScale(0.9)
    assert not est.update_big(2 + 48 / 16, 16, step=0)  # no tr(Sigma) yet: nothing to subtract
    for step in range(1, 40):
        big = 16 + 8 * (step % 3)
        if step % 4 == 1:
            assert est.update([2 + 48 / 4], 4, 2 + 48 / big, big, step=step)
        else:
            assert est.update_big(2 + 48 / big, big, step=step)
    assert est.grad_sq == pytest.approx(2.0, rel=1e-12)
    assert est.trace_cov == pytest.approx(48.0, rel=1e-12)
    assert est.num_updates == 10
    assert not est.update_big(float("nan"), 16, step=40) and est.num_rejected == 1


def test_standard_errors_with_big_only_steps_match_the_spread_over_repeats() -> None:
    # Gaussian per-example gradients g_i ~ N(G, I) in d dimensions, so |G|^2 and tr(Sigma) = d
    # are known. Each repeat: 120 steps of B=8, two halves of 4 on every 6th step, only the
    # whole-step norm on the others; plain means (smoothing None). The reported standard
    # errors must match the spread of the estimates over 300 repeats.
    rng = np.random.default_rng(0)
    d, big, steps, repeats, every = 20, 8, 120, 300, 6
    mean = np.full(d, 0.3)
    estimates, stderrs, pairs_only = [], [], []
    for _ in range(repeats):
        est = GradientNoiseScale(smoothing=None, min_updates=2)
        sparse = GradientNoiseScale(smoothing=None, min_updates=2)  # the two-batch steps alone
        g = mean + rng.normal(size=(steps, big, d))
        for t in range(steps):
            whole = np.sum(g[t].mean(0) ** 2)
            if t % every == 0:
                halves = [np.sum(g[t, :4].mean(0) ** 2), np.sum(g[t, 4:].mean(0) ** 2)]
                est.update(halves, 4, whole, big, step=t)
                sparse.update(halves, 4, whole, big, step=t)
            else:
                est.update_big(whole, big, step=t)
        estimates.append((est.grad_sq_mean, est.trace_cov, est.noise_scale))
        stderrs.append((est.grad_sq_stderr, est.trace_cov_stderr, est.noise_scale_stderr))
        pairs_only.append(sparse.grad_sq_mean)
    estimates, stderrs = np.array(estimates), np.array(stderrs)
    assert estimates[:, 0].mean() == pytest.approx(np.sum(mean**2), rel=0.05)  # unbiased
    assert estimates[:, 1].mean() == pytest.approx(d, rel=0.05)
    spread = estimates.std(axis=0)
    assert np.median(stderrs, axis=0) == pytest.approx(spread, rel=0.2)
    # The whole-step norms of the other steps make |G|^2 less spread (here 0.22 vs 0.34).
    assert spread[0] < 0.75 * np.std(pairs_only)


def test_grad_sq_stderr_counts_the_split_steps_trace_draws_in_both_averages() -> None:
    # One coordinate, g_i ~ N(G, 1), B_simple/B = 4: steps of B=8, split in two halves every
    # 8th step (fit's default on a step of one micro-batch), the whole-step norm on the others.
    # The |G|^2 average subtracts the tr(Sigma) average from the big-only draws, and the split
    # steps' tr(Sigma) draws are correlated with their own |G|^2 draws in the same average;
    # without that covariance the standard error was 9-10% below the spread over repeats.
    rng = np.random.default_rng(0)
    big, steps, repeats = 8, 160, 1000
    grad_sq = 1.0 / (4 * big)
    g = math.sqrt(grad_sq) + rng.standard_normal((repeats, steps, 2, big // 2))
    halves = g.mean(axis=3) ** 2
    whole = g.mean(axis=(2, 3)) ** 2
    estimates, stderrs = [], []
    for r in range(repeats):
        est = GradientNoiseScale(smoothing=None)
        for t in range(steps):
            if t % 8 == 0:
                est.update(halves[r, t], big // 2, whole[r, t], big, step=t + 1)
            else:
                est.update_big(whole[r, t], big, step=t + 1)
        estimates.append(est.grad_sq_mean)
        stderrs.append(est.grad_sq_stderr)
    estimates, stderrs = np.array(estimates), np.array(stderrs)
    assert estimates.mean() == pytest.approx(grad_sq, abs=0.1 * estimates.std())  # unbiased
    assert np.sqrt(np.mean(stderrs**2)) == pytest.approx(estimates.std(), rel=0.05)


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_student_width_is_the_t_quantile_of_the_normal_coverage() -> None:
    for z in (0.5, 1.0, 2.0):
        p = _normal_cdf(z)
        assert student_width(z, math.inf) == z
        # closed forms: 1 degree of freedom (Cauchy) and 2
        assert student_width(z, 1.0) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=0.13)
        assert student_width(z, 2.0) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=0.01)
        assert student_width(z, 1e6) == pytest.approx(z, rel=1e-5)
    stats = pytest.importorskip("scipy.stats")
    for dof in (3.0, 4.5, 10.0, 40.0):
        for z in (0.5, 1.0, 1.5, 2.0):
            assert student_width(z, dof) == pytest.approx(stats.t.ppf(_normal_cdf(z), dof), rel=0.002)


@pytest.mark.parametrize("split_every", [1, 8])
def test_intervals_cover_the_true_values_as_often_as_z_promises(split_every: int) -> None:
    # Calibration on a simulated case: g_i ~ N(G, I) in d = 20 dimensions, B = 8, B_simple/B = 4,
    # EMA 0.95 as fit uses it, 160 steps. split_every=1: every step in two halves; 8: fit's
    # default on a step of one micro-batch (halves every 8th step, the whole-step norm on the
    # others), where tr(Sigma) rests on about 5 effective draws. Over 1000 repeats, each
    # average's interval at z standard errors, widened by the degrees of freedom, must hold its
    # true value about as often as a normal z interval (68.3% at z=1, 95.4% at z=2), and the
    # box interval for B_simple at least as often.
    rng = np.random.default_rng(0)
    d, big, steps, repeats = 20, 8, 160, 1000
    grad_sq = d / (4 * big)
    g = math.sqrt(grad_sq / d) + rng.standard_normal((repeats, steps, 2, big // 2, d))
    halves = (g.mean(axis=3) ** 2).sum(axis=-1)
    whole = (g.mean(axis=(2, 3)) ** 2).sum(axis=-1)
    hits = {key: 0 for key in ("g1", "s1", "box1", "g2", "s2", "box2", "s1_plain")}
    for r in range(repeats):
        est = GradientNoiseScale(0.95)
        for t in range(steps):
            if t % split_every == 0:
                est.update(halves[r, t], big // 2, whole[r, t], big, step=t + 1)
            else:
                est.update_big(whole[r, t], big, step=t + 1)
        stats = (est.grad_sq_mean, est.trace_cov, est.grad_sq_stderr, est.trace_cov_stderr)
        for z in (1, 2):
            w_g, w_s = student_width(z, est.grad_sq_dof), student_width(z, est.trace_cov_dof)
            hits[f"g{z}"] += abs(est.grad_sq_mean - grad_sq) <= w_g * est.grad_sq_stderr
            hits[f"s{z}"] += abs(est.trace_cov - d) <= w_s * est.trace_cov_stderr
            low, high = noise_scale_interval(*stats, z, grad_sq_dof=est.grad_sq_dof, trace_cov_dof=est.trace_cov_dof)
            hits[f"box{z}"] += low <= d / grad_sq <= high
        hits["s1_plain"] += abs(est.trace_cov - d) <= est.trace_cov_stderr
    cover = {key: n / repeats for key, n in hits.items()}
    assert 0.65 <= cover["g1"] <= 0.73 and 0.65 <= cover["s1"] <= 0.73
    assert 0.935 <= cover["g2"] <= 0.995 and 0.935 <= cover["s2"] <= 0.995
    assert cover["box1"] >= 0.68 and cover["box2"] >= 0.95
    if split_every == 8:  # about 5 effective draws: the plain z=1 interval of tr(Sigma) falls short
        assert cover["s1_plain"] < cover["s1"] - 0.04


def test_degrees_of_freedom_follow_the_effective_draws() -> None:
    est = GradientNoiseScale(0.9)
    assert est.grad_sq_dof == 0.0 and est.trace_cov_dof == 0.0
    rng = np.random.default_rng(0)
    for step in range(1, 200):
        est.update([3.0 + rng.random()], 4, 1.0 + rng.random(), 8, step=step)
    # two-batch steps only: both averages rest on the same (1+0.9)/(1-0.9) = 19 draws
    assert est.trace_cov_dof == pytest.approx(18.0, rel=1e-3)
    assert est.grad_sq_dof == pytest.approx(est.trace_cov_dof)
    for step in range(200, 400):  # a split step every 8th, the whole-step norm on the others
        if step % 8:
            est.update_big(1.0 + rng.random(), 8, step=step)
        else:
            est.update([3.0 + rng.random()], 4, 1.0 + rng.random(), 8, step=step)
    # tr(Sigma): about (1+0.9^8)/(1-0.9^8) draws; |G|^2 between that and every step's 19
    assert est.trace_cov_dof == pytest.approx((1 + 0.9**8) / (1 - 0.9**8) - 1, rel=0.01)
    assert est.trace_cov_dof < est.grad_sq_dof < 18.0


def test_results_read_between_updates_are_never_stale() -> None:
    # The estimator memoizes its results per state: after every update, each one must equal
    # that of a fresh estimator loaded with the same state (which has computed nothing yet).
    est = GradientNoiseScale(0.9)
    rng = np.random.default_rng(0)
    names = ("grad_sq", "grad_sq_mean", "trace_cov", "noise_scale", "noise_scale_stderr",
             "grad_sq_stderr", "trace_cov_stderr", "grad_sq_dof", "trace_cov_dof", "effective_samples", "ready")
    for step in range(1, 30):
        small, big = 2.0 + rng.random(), 1.0 + 0.5 * rng.random()
        if step % 3:
            est.update([small], 8, big, 16, step=step)
        else:
            est.update_big(big, 16, step=step)
        read = [getattr(est, n) for n in names]  # fills the memo
        fresh = GradientNoiseScale(0.9)
        fresh.load_state_dict(est.state_dict())
        assert read == pytest.approx([getattr(fresh, n) for n in names], nan_ok=True)
        assert [getattr(est, n) for n in names] == pytest.approx(read, nan_ok=True)
