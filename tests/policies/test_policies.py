"""Batch-size policies (autobatch/policies/): rounding, gns, goodput, ramp and fixed against
hand and brute-force answers, then the shared suite every registered policy runs."""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pytest

from autobatch.config import FitConfig
from autobatch.policies import (
    BatchSizePolicy,
    FixedPolicy,
    GNSPolicy,
    GoodputPolicy,
    PolicyContext,
    RampPolicy,
    fit_step_time,
    round_batch_size,
)
from autobatch.registry import POLICIES, make_policy


def _ctx(**kw: object) -> PolicyContext:
    base = {
        "step": 10,
        "epoch": 0.5,
        "samples": 320,
        "batch_size": 32,
        "base_batch_size": 32,
        "min_batch_size": 1,
        "max_batch_size": 100_000,
        "noise_scale": math.nan,
        "noise_ready": False,
        "noise_scale_stderr": 0.0,  # an exact estimate unless a test says otherwise
    }
    base.update(kw)
    return PolicyContext(**base)  # type: ignore[arg-type]


def _allowed(lo: int, hi: int, round_to: int) -> list[int]:
    return [n for n in range(lo, hi + 1) if n <= round_to or n % round_to == 0]


def _brute_round(b: float, round_to: int, lo: int, hi: int) -> int:
    x = min(max(b, lo), hi)
    allowed = _allowed(lo, hi, round_to) or list(range(lo, hi + 1))
    return min(allowed, key=lambda n: (abs(n - x), -n))  # nearest, ties up


# -- rounding ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("b", "round_to", "lo", "hi", "expected"),
    [
        (33, 8, 1, 1000, 32),
        (36, 8, 1, 1000, 40),  # tie rounds up
        (5.4, 8, 1, 1000, 5),  # at or below round_to: plain integers
        (1000.0, 8, 1, 100, 96),  # clipped to 100, the largest multiple below it
        (3, 8, 16, 100, 16),
        (35, 8, 33, 39, 35),  # no multiple of 8 in [33, 39]
        (17, 8, 17, 64, 24),
    ],
)
def test_round_batch_size_by_hand(b: float, round_to: int, lo: int, hi: int, expected: int) -> None:
    assert round_batch_size(b, round_to, lo, hi) == expected


def test_round_batch_size_matches_brute_force() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        round_to = rng.choice([1, 4, 8, 16])
        lo = rng.randint(1, 80)
        hi = rng.randint(lo, 300)
        b = rng.uniform(0.5, 400)
        assert round_batch_size(b, round_to, lo, hi) == _brute_round(b, round_to, lo, hi), (b, round_to, lo, hi)


def test_round_batch_size_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"got b=nan, round_to=8, lo=1, hi=10"):
        round_batch_size(math.nan, 8, 1, 10)
    with pytest.raises(ValueError, match=r"1 <= lo <= hi \(got b=5, round_to=8, lo=20, hi=10\)"):
        round_batch_size(5, 8, 20, 10)


# -- gns ---------------------------------------------------------------------------------------
def test_gns_grows_at_most_max_growth_per_decision() -> None:
    ready = {"noise_ready": True, "noise_scale_stderr": 1.0}
    assert GNSPolicy().propose(_ctx(batch_size=32, noise_scale=1000.0, **ready)) == 64
    assert GNSPolicy(max_growth=4.0).propose(_ctx(batch_size=32, noise_scale=1000.0, **ready)) == 128
    # From 10 the window is [5, 20]; 20 is no multiple of 8, the largest inside is 16.
    assert GNSPolicy().propose(_ctx(batch_size=10, noise_scale=1000.0, **ready)) == 16
    # Shrinking is limited by the same factor.
    assert GNSPolicy().propose(_ctx(batch_size=64, noise_scale=5.0, **ready)) == 32


def test_gns_converges_to_the_rounded_target() -> None:
    policy, b, seen = GNSPolicy(), 32, []
    for _ in range(6):
        b = policy.propose(_ctx(batch_size=b, noise_scale=500.0, noise_ready=True))
        seen.append(b)
    # 64, 128, 256, then min(512, round(500)) = 504 (500/8 = 62.5 rounds up), and it stays.
    assert seen == [64, 128, 256, 504, 504, 504]


def test_gns_hysteresis_and_multiplier() -> None:
    policy = GNSPolicy(round_to=1)  # hysteresis 5% of 32 = 1.6
    assert policy.propose(_ctx(batch_size=32, noise_scale=33.0, noise_ready=True)) == 32
    assert policy.propose(_ctx(batch_size=32, noise_scale=34.0, noise_ready=True)) == 34
    assert GNSPolicy().propose(_ctx(batch_size=32, noise_scale=33.0, noise_ready=True)) == 32  # rounds to 32
    assert GNSPolicy(noise_multiplier=2.0).propose(_ctx(batch_size=32, noise_scale=20.0, noise_ready=True)) == 40


def test_gns_clips_to_the_bounds() -> None:
    ctx = _ctx(batch_size=64, noise_scale=1000.0, noise_ready=True, max_batch_size=100)
    assert GNSPolicy().propose(ctx) == 96
    ctx = _ctx(batch_size=32, noise_scale=1.0, noise_ready=True, min_batch_size=24)
    assert GNSPolicy().propose(ctx) == 24


@pytest.mark.parametrize(("noise", "ready"), [(1000.0, False), (math.nan, True), (-5.0, True), (math.inf, True)])
def test_gns_keeps_the_batch_without_a_usable_estimate(noise: float, ready: bool) -> None:
    assert GNSPolicy().propose(_ctx(batch_size=48, noise_scale=noise, noise_ready=ready)) == 48


# -- goodput -----------------------------------------------------------------------------------
def _true_time(b: int, t0: float, t1: float, micro: int | None) -> float:
    steps = 1 if micro is None else -(-b // micro)
    return steps * t0 + t1 * b


def _brute_goodput(ctx: PolicyContext, t0: float, t1: float, max_growth: float, round_to: int) -> int:
    """The best allowed size within the growth window, evaluating the definition directly."""
    lo = max(ctx.min_batch_size, math.ceil(ctx.batch_size / max_growth))
    hi = min(ctx.max_batch_size, math.floor(ctx.batch_size * max_growth))
    noise, b0 = ctx.noise_scale, ctx.base_batch_size

    def value(b: int) -> float:
        return b / _true_time(b, t0, t1, ctx.max_micro_batch_size) * (noise + b0) / (noise + b)

    return max(_allowed(lo, hi, round_to), key=lambda b: (value(b), -b))


def test_fit_step_time_recovers_a_synthetic_model() -> None:
    t0, t1 = 0.01, 1e-4
    times = {b: _true_time(b, t0, t1, None) for b in (32, 64, 128)}
    assert fit_step_time(times, None) == pytest.approx((t0, t1), rel=1e-9)
    times = {b: _true_time(b, t0, t1, 64) for b in (32, 64, 100, 256)}
    assert fit_step_time(times, 64) == pytest.approx((t0, t1), rel=1e-9)
    # One size: perfect scaling assumed (all of the time is per-micro-step overhead).
    assert fit_step_time({64: 0.5}, None) == (0.5, 0.0)


def test_fit_step_time_keeps_coefficients_non_negative() -> None:
    t0, t1 = fit_step_time({32: 0.5, 64: 0.4, 128: 0.3}, None)  # time falls with B: noise
    assert t0 >= 0 and t1 >= 0
    with pytest.raises(ValueError, match=r"got \{32: 0.0\}"):
        fit_step_time({32: 0.0}, None)


def test_goodput_optimum_in_closed_form() -> None:
    # No accumulation: goodput(B) = B/(t0 + t1 B) * (Bn + B0)/(Bn + B) peaks at
    # B* = sqrt(t0 Bn / t1) = sqrt(0.01 * 400 / 1e-4) = 200 (a multiple of 8).
    t0, t1 = 0.01, 1e-4
    ctx = _ctx(
        batch_size=128,
        noise_scale=400.0,
        noise_ready=True,
        step_time_s={b: _true_time(b, t0, t1, None) for b in (32, 64, 128)},
    )
    assert GoodputPolicy().propose(ctx) == 200


@pytest.mark.parametrize("micro", [None, 48, 64])
@pytest.mark.parametrize("current", [32, 96, 200])
@pytest.mark.parametrize("noise", [50.0, 400.0, 3000.0])
def test_goodput_matches_brute_force(micro: int | None, current: int, noise: float) -> None:
    t0, t1 = 0.02, 3e-4
    times = {b: _true_time(b, t0, t1, micro) for b in (32, 64, 160)}
    ctx = _ctx(
        batch_size=current,
        noise_scale=noise,
        noise_ready=True,
        max_micro_batch_size=micro,
        step_time_s=times,
    )
    best = _brute_goodput(ctx, t0, t1, max_growth=2.0, round_to=8)
    expected = best if abs(best - current) > 0.05 * current else current
    assert GoodputPolicy().propose(ctx) == expected


def test_goodput_explores_upward_from_a_single_measurement_and_waits_for_data() -> None:
    ready = {"noise_scale": 400.0, "noise_ready": True}
    assert GoodputPolicy().propose(_ctx(batch_size=32, step_time_s={32: 0.1}, **ready)) == 64
    assert GoodputPolicy().propose(_ctx(batch_size=32, **ready)) == 32  # no time measured
    assert GoodputPolicy().propose(_ctx(batch_size=32, step_time_s={32: 0.1}, noise_scale=400.0)) == 32


def test_goodput_prefers_small_batches_when_throughput_is_flat() -> None:
    # t1 only: throughput is the same at every B, so efficiency decides: shrink.
    ctx = _ctx(batch_size=128, noise_scale=100.0, noise_ready=True, min_batch_size=32,
               step_time_s={64: 64e-3, 128: 128e-3})
    assert GoodputPolicy().propose(ctx) == 64


# -- ramp and fixed ----------------------------------------------------------------------------
def test_ramp_grows_then_decays_the_lr_once_capped() -> None:
    policy = RampPolicy(lr_milestones=[2, 4, 6], lr_decay=0.1)
    ctxs = {e: _ctx(epoch=e, max_batch_size=1000) for e in (0.0, 1.99, 2.0, 4.5, 6.0)}
    assert [policy.propose(c) for c in ctxs.values()] == [32, 32, 320, 1000, 1000]
    assert [policy.lr_factor(c) for c in ctxs.values()] == pytest.approx([1, 1, 1, 1000 / 3200, 1000 / 32000])


@pytest.mark.parametrize(("decay", "cap"), [(0.1, 1000), (0.5, 200), (0.2, 100_000)])
def test_ramp_keeps_the_step_schedule_noise(decay: float, cap: int) -> None:
    # SGD noise ~ LR / B: the ramp's LR/B must equal the step schedule's base_lr * decay^n / B0.
    policy, fixed = (
        RampPolicy(lr_milestones=[1, 2, 3, 4], lr_decay=decay),
        FixedPolicy(lr_milestones=[1, 2, 3, 4], lr_decay=decay),
    )
    for epoch in [0.0, 0.5, 1.0, 2.2, 3.0, 4.7]:
        ctx = _ctx(epoch=epoch, max_batch_size=cap)
        b = policy.propose(ctx)
        if b == policy.propose(replace(ctx, max_batch_size=10**9)):  # not capped, not rounded
            assert policy.lr_factor(ctx) == 1.0
        assert policy.lr_factor(ctx) / b == pytest.approx(fixed.lr_factor(ctx) / 32, rel=1e-12)


def test_ramp_needs_milestones_and_a_decay_below_one() -> None:
    with pytest.raises(ValueError, match=r"0 < lr_decay < 1 \(got lr_decay=1.0\)"):
        RampPolicy(lr_milestones=[1], lr_decay=1.0)
    with pytest.raises(ValueError, match=r"needs lr_milestones \(got lr_milestones=\[\]\).*; .*lr_decay=0.0\)"):
        RampPolicy(lr_milestones=[], lr_decay=0.0)
    # The constructor and a config share one check (the registry asks the class).
    assert set(RampPolicy.check_settings(lr_milestones=[], lr_decay=2.0)) == {"lr_milestones", "lr_decay"}
    assert RampPolicy.check_settings(lr_milestones=[3], lr_decay=0.5) == {}


def test_fixed_keeps_b0_and_steps_the_lr() -> None:
    policy = FixedPolicy(lr_milestones=[3, 6], lr_decay=0.5)
    for epoch, factor in [(0.0, 1.0), (2.9, 1.0), (3.0, 0.5), (7.0, 0.25)]:
        ctx = _ctx(epoch=epoch, batch_size=32, noise_scale=1e4, noise_ready=True)
        assert policy.propose(ctx) == 32
        assert policy.lr_factor(ctx) == factor


def test_measure_keeps_b0_and_the_lr_and_needs_the_estimator() -> None:
    policy = make_policy("measure", *_sections(lr_milestones=[1, 2]))
    for epoch, noise in [(0.0, math.nan), (1.5, 10.0), (3.0, 1e5)]:
        ctx = _ctx(epoch=epoch, batch_size=64, base_batch_size=32, noise_scale=noise, noise_ready=noise == noise)
        assert policy.propose(ctx) == 32  # back to B0 whatever B is
        assert policy.lr_factor(ctx) == 1.0  # milestones decay nothing
    assert FitConfig.from_any(None, policy="measure").lr.lr_scaling == "none"
    from autobatch.train.controller import build_controller

    with pytest.raises(ValueError, match="gns_method='off' leaves policy='measure'"):
        build_controller(FitConfig.from_any(None, policy="measure"), optimizer="sgd", method="off",
                         base_batch_size=32, max_batch_size=64, micro_batch_size=None, min_micro_batches=1)


def _sections(**settings: Any) -> tuple[Any, Any]:
    cfg = FitConfig.from_any(None, **settings)
    return cfg.batch, cfg.lr


# -- the family --------------------------------------------------------------------------------
def test_make_policy_reads_the_config() -> None:
    cfg = FitConfig.from_any(
        None, noise_multiplier=2.0, max_growth=3.0, hysteresis=0.1, round_to=4, lr_milestones=[5], lr_decay=0.5
    )
    gns = make_policy("gns", cfg.batch, cfg.lr)
    assert isinstance(gns, GNSPolicy)
    assert (gns.noise_multiplier, gns.max_growth, gns.hysteresis, gns.round_to) == (2.0, 3.0, 0.1, 4)
    ramp = make_policy("ramp", cfg.batch, cfg.lr)
    assert isinstance(ramp, RampPolicy) and (ramp.lr_milestones, ramp.lr_decay, ramp.round_to) == ([5], 0.5, 4)
    fixed = make_policy("fixed", cfg.batch, cfg.lr)
    assert isinstance(fixed, FixedPolicy) and (fixed.lr_milestones, fixed.lr_decay) == ([5], 0.5)
    goodput = make_policy("goodput", cfg.batch, cfg.lr)
    assert isinstance(goodput, GoodputPolicy) and goodput.max_growth == 3.0
    mine = GNSPolicy()
    assert make_policy(mine, cfg.batch, cfg.lr) is mine
    with pytest.raises(ValueError, match=r"unknown policy 'gnss'; allowed: budget, fixed, gns, goodput, measure, ramp, "
                                         r"schedule, or a "
                                         r"BatchSizePolicy instance; did you mean 'gns'\?"):
        make_policy("gnss", cfg.batch, cfg.lr)
    with pytest.raises(ValueError, match=r"unknown policy 3; allowed: budget, fixed, gns"):
        make_policy(3, cfg.batch, cfg.lr)  # type: ignore[arg-type]


def _random_contexts(n: int) -> list[PolicyContext]:
    rng = random.Random(2)
    out = []
    for _ in range(n):
        lo = rng.randint(1, 64)
        b0 = rng.randint(lo, 128)
        hi = rng.randint(b0, 4096)
        out.append(
            _ctx(
                epoch=rng.uniform(0, 8),
                batch_size=rng.choice([b0, round_batch_size(rng.randint(lo, hi), 8, lo, hi)]),
                base_batch_size=b0,
                min_batch_size=lo,
                max_batch_size=hi,
                noise_scale=10 ** rng.uniform(0, 4),
                noise_ready=rng.random() < 0.8,
                max_micro_batch_size=rng.choice([None, 16, 100]),
                step_time_s={b: 0.01 + 1e-4 * b for b in rng.sample([16, 32, 64, 256], rng.randint(0, 3))},
            )
        )
    return out


# -- the shared suite: every policy in the registry ---------------------------------------------
_SUITE_CONFIG = FitConfig.from_any(None, lr_milestones=[2, 4], lr_decay=0.5)


@pytest.fixture(params=sorted(POLICIES))
def make(request: pytest.FixtureRequest) -> Callable[[], BatchSizePolicy]:
    """Builds a fresh policy of one registered name from the same config each call."""
    return lambda: make_policy(request.param, _SUITE_CONFIG.batch, _SUITE_CONFIG.lr)


def test_every_policy_proposes_an_allowed_size(make: Callable[[], BatchSizePolicy]) -> None:
    policy, round_to = make(), _SUITE_CONFIG.batch.round_to
    for ctx in _random_contexts(200):
        b = policy.propose(ctx)
        assert ctx.min_batch_size <= b <= ctx.max_batch_size
        # Sizes are rounded; only the current size and B0 (the user's choice) may be kept as is.
        rounded = round_batch_size(b, round_to, ctx.min_batch_size, ctx.max_batch_size)
        assert b == rounded or b in {ctx.batch_size, ctx.base_batch_size}
        if isinstance(policy, (GNSPolicy, GoodputPolicy)):
            assert ctx.batch_size / 2.0 <= b <= ctx.batch_size * 2.0
        assert 0.0 < policy.lr_factor(ctx) <= 1.0


def _run(policy: BatchSizePolicy, contexts: list[PolicyContext], b: int) -> list[tuple[int, float]]:
    """Feed ``contexts`` in order as a loop would, each at the batch size the policy chose last;
    returns every (proposal, lr_factor)."""
    out = []
    for ctx in contexts:
        ctx = replace(ctx, batch_size=min(max(b, ctx.min_batch_size), ctx.max_batch_size))
        b = policy.propose(ctx)
        out.append((b, policy.lr_factor(ctx)))
    return out


def _decision_contexts(n: int) -> list[PolicyContext]:
    """One run's contexts: the epoch advances, the noise estimate and step times drift."""
    rng = random.Random(5)
    return [
        _ctx(
            step=10 * (i + 1), epoch=0.1 * i, batch_size=32, base_batch_size=32, min_batch_size=8,
            max_batch_size=2048, noise_scale=50.0 * 1.05**i * rng.uniform(0.8, 1.25),
            noise_ready=i > 2, noise_scale_stderr=rng.uniform(1.0, 30.0),
            step_time_s={32: 0.02, 64: 0.03, 128: 0.05},
        )
        for i in range(n)
    ]


def assert_resumes_identically(make: Callable[[], BatchSizePolicy]) -> None:
    """A policy's decisions after a checkpoint equal those of a fresh policy that loaded the
    checkpoint (state pickled, as the checkpoint file stores it)."""
    contexts = _decision_contexts(60)
    original = make()
    first = _run(original, contexts[:31], 32)
    state = pickle.loads(pickle.dumps(original.state_dict()))
    restored = make()
    restored.load_state_dict(state)
    assert restored.state_dict() == original.state_dict()
    b = first[-1][0]
    assert _run(restored, contexts[31:], b) == _run(original, contexts[31:], b)


def test_every_policy_resumes_from_its_state(make: Callable[[], BatchSizePolicy]) -> None:
    assert_resumes_identically(make)


class _Streak(BatchSizePolicy):
    """A policy with state: grows B by 8 after every third decision that saw a ready noise
    estimate (a stand-in for any policy that remembers its past)."""

    def __init__(self, *, save_state: bool = True) -> None:
        self.save_state = save_state
        self._streak = 0

    def propose(self, ctx: PolicyContext) -> int:
        self._streak += ctx.noise_ready
        if self._streak < 3:
            return ctx.batch_size
        self._streak = 0
        return min(ctx.batch_size + 8, ctx.max_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self._streak} if self.save_state else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._streak = state.get("streak", 0)


def test_the_resume_check_catches_a_policy_that_loses_its_state() -> None:
    # The check above is real: a policy that forgets its streak on checkpoint decides
    # differently after a restore, and the check says so.
    assert_resumes_identically(_Streak)
    with pytest.raises(AssertionError):
        assert_resumes_identically(lambda: _Streak(save_state=False))


def test_a_user_policy_needs_only_propose() -> None:
    class Double(BatchSizePolicy):
        def propose(self, ctx: PolicyContext) -> int:
            return 2 * ctx.batch_size

    cfg = FitConfig.from_any(None, policy=Double())
    policy = make_policy(cfg.batch.policy, cfg.batch, cfg.lr)
    assert policy.propose(_ctx(batch_size=20)) == 40 and policy.lr_factor(_ctx()) == 1.0


def test_gns_moves_only_on_significant_evidence() -> None:
    policy = GNSPolicy(round_to=1, confidence=2.0)
    ready = {"noise_ready": True, "batch_size": 32}
    # 32 lies inside 40 +- 2*5: no move, however far the mean is from 32 in relative terms.
    assert policy.propose(_ctx(noise_scale=40.0, noise_scale_stderr=5.0, **ready)) == 32
    # 60 +- 2*5 = [50, 70]: grow to the band's near edge, 50, not to the mean.
    assert policy.propose(_ctx(noise_scale=60.0, noise_scale_stderr=5.0, **ready)) == 50
    # 10 +- 2*2 = [6, 14]: shrink to 14, the near edge.
    assert policy.propose(_ctx(noise_scale=10.0, noise_scale_stderr=2.0, **ready)) == 16  # growth limit 2x
    assert policy.propose(_ctx(noise_scale=20.0, noise_scale_stderr=2.0, **ready)) == 24
    # an infinite stderr (too few updates) never moves
    assert policy.propose(_ctx(noise_scale=1e4, noise_scale_stderr=math.inf, **ready)) == 32
    with pytest.raises(ValueError, match="confidence=-1"):
        GNSPolicy(confidence=-1)


def test_gns_widens_an_interval_whose_standard_errors_rest_on_few_draws() -> None:
    policy = GNSPolicy(round_to=1)
    stats = {"noise_ready": True, "batch_size": 32, "noise_scale": 40.0, "grad_sq_mean": 1.0,
             "trace_cov": 40.0, "grad_sq_stderr": 0.1, "trace_cov_stderr": 1.0}
    # [39/1.1, 41/0.9] = [35.5, 45.6] lies above 32: grow to its lower edge...
    assert policy.propose(_ctx(**stats)) == 35
    # ...but with 2 degrees of freedom each bound moves 1.32 standard errors (Student t):
    # [38.7/1.132, ...] = [34.2, ...]; with 1, 1.81: [38.2/1.18, ...] = [32.3, ...].
    assert policy.propose(_ctx(**stats, grad_sq_dof=2.0, trace_cov_dof=2.0)) == 34
    assert policy.propose(_ctx(**stats, grad_sq_dof=1.0, trace_cov_dof=1.0)) == 32


def test_noise_confidence_reaches_the_gns_policy_from_the_config() -> None:
    cfg = FitConfig.from_any(None, noise_confidence=0.0, round_to=1)
    policy = make_policy(cfg.batch.policy, cfg.batch, cfg.lr)
    # With confidence 0 the policy follows the average even inside a wide error band.
    ctx = _ctx(batch_size=32, noise_scale=40.0, noise_scale_stderr=30.0, noise_ready=True)
    assert policy.propose(ctx) == 40
    strict = make_policy("gns", FitConfig.from_any(None, round_to=1).batch, cfg.lr)
    assert strict.propose(ctx) == 32
