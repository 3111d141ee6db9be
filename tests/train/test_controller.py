"""BatchSizeController, the custom-loop API: micro-batch splits, the LR factor, the decision
cadence, OOM handling and checkpoints, each against values worked out by hand."""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from autobatch.noise import GradientNoiseScale
from autobatch.policies import BatchSizePolicy, GNSPolicy, PolicyContext
from autobatch.scaling import AdaScaleScaling, LinearScaling, LRScaling, adascale_gain
from autobatch.train import BatchSizeController


class _Script(BatchSizePolicy):
    """Proposes the given sizes in turn (then keeps the last) and records what it saw."""

    def __init__(self, sizes: Sequence[int] = (), schedule: float = 1.0) -> None:
        self.sizes = list(sizes)
        self.schedule = schedule
        self.seen: list[PolicyContext] = []

    def propose(self, ctx: PolicyContext) -> int:
        self.seen.append(ctx)
        return self.sizes.pop(0) if self.sizes else ctx.batch_size

    def lr_factor(self, ctx: PolicyContext) -> float:
        return self.schedule


def _controller(
    policy: BatchSizePolicy | None = None,
    scaling: LRScaling | None = None,
    estimator: GradientNoiseScale | None = None,
    **kw: object,
) -> BatchSizeController:
    settings = {"base_batch_size": 16, "min_batch_size": 8, "max_batch_size": 512, "decide_every": 1}
    settings.update(kw)
    return BatchSizeController(
        policy=policy or _Script(),
        scaling=scaling or LinearScaling(),
        estimator=estimator or GradientNoiseScale(),
        **settings,  # type: ignore[arg-type]
    )


def _norms(small: list[float], b: float, big: float, big_b: float) -> SimpleNamespace:
    return SimpleNamespace(small_sq_norms=small, small_batch_size=b, big_sq_norm=big, big_batch_size=big_b)


def _step(c: BatchSizeController, step: int, norms: SimpleNamespace | None = None,
          seconds: float | None = None) -> int | None:
    """One optimizer step as a loop reports it (B examples, one epoch = 1,000 examples)."""
    c.observe(step=step, epoch=step * c.batch_size / 1000, samples=step * c.batch_size,
              batch_size=c.batch_size, step_time_s=seconds, norms=norms)
    return c.maybe_decide()


# -- micro-batches -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cap", "min_micro", "examples", "expected"),
    [
        (None, 2, 10, [5, 5]),
        (None, 2, 7, [4, 3]),  # the first one larger by one
        (None, 2, 1, [1]),  # one example cannot be split
        (None, 1, 10, [10]),
        (4, 2, 10, [4, 3, 3]),  # ceil(10/4) = 3 pieces
        (4, 2, 4, [2, 2]),  # fits the cap, still two pieces for the estimator
        (3, 2, 13, [3, 3, 3, 2, 2]),
    ],
)
def test_micro_sizes_by_hand(cap: int | None, min_micro: int, examples: int, expected: list[int]) -> None:
    c = _controller(max_micro_batch_size=cap, min_micro_batches=min_micro)
    assert c.micro_sizes(examples) == expected


def test_micro_sizes_cover_the_step_within_the_cap() -> None:
    for cap in (1, 3, 8, None):
        c = _controller(max_micro_batch_size=cap)
        for n in range(1, 70):
            sizes = c.micro_sizes(n)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert len(sizes) == max(min(2, n), math.ceil(n / (cap or n)))
            assert cap is None or max(sizes) <= cap


# -- the LR factor -----------------------------------------------------------------------------
def test_lr_factor_is_the_capped_rule_times_the_policy_schedule() -> None:
    # B0 = 16; the linear rule gives B/16 (no noise known, so no noise cap); max_lr_factor = 2.
    policy = _Script([24, 64, 8, 64])
    c = _controller(policy, LinearScaling(), max_lr_factor=2.0)
    assert c.lr_factor() == 1.0
    expected = {24: 1.5, 64: 2.0, 8: 0.5}  # 64/16 = 4 is capped at 2
    for step, b in enumerate([24, 64, 8], start=1):
        assert _step(c, step) == b
        assert c.lr_factor() == expected[b]
    policy.schedule = 0.1  # a schedule multiplies after the cap: 2 x 0.1
    assert _step(c, 4) == 64
    assert c.lr_factor() == pytest.approx(0.2)
    uncapped = _controller(_Script([64]), LinearScaling(), max_lr_factor=None)
    _step(uncapped, 1)
    assert uncapped.lr_factor() == 4.0


def test_lr_factor_holds_through_a_lost_estimate() -> None:
    # A plain running mean (smoothing=None) ready after one update; b=8 of B=16, so
    # 1/b - 1/B = 1/16: tr = 16 (|G_b|^2 - |G_B|^2) and |G|^2 = |G_B|^2 - tr/16.
    est = GradientNoiseScale(smoothing=None, min_updates=1)
    c = _controller(_Script([64]), AdaScaleScaling(), est, max_lr_factor=None)
    assert _step(c, 1, _norms([3.0], 8, 2.0, 16)) == 64  # tr 16, |G|^2 1: ready
    known = adascale_gain(64, 16, 1.0, 16.0)
    assert known == pytest.approx((1 + 1) / (1 / 4 + 1))  # s2 = 16/16, S = 4: 1.6
    assert c.lr_factor() == pytest.approx(known)
    # A step with |G_b|^2 = 10, |G_B|^2 = 0: tr 160, |G|^2 -10; the mean |G|^2 is -4.5 < 0.
    _step(c, 2, _norms([10.0], 8, 0.0, 16))
    assert not est.ready
    assert c.lr_factor() == pytest.approx(known)  # held, not 1
    assert AdaScaleScaling().factor(64, 16, grad_sq=math.nan, trace_cov=math.nan) == 1.0  # what it was
    # Found again: the new estimate counts (means over 4 steps: tr (16+160+16+16)/4 = 52,
    # |G|^2 (1-10+5+5)/4 = 0.25; the later steps have |G_b|^2 = 7, |G_B|^2 = 6: tr 16, |G|^2 5).
    _step(c, 3, _norms([7.0], 8, 6.0, 16))
    _step(c, 4, _norms([7.0], 8, 6.0, 16))
    assert est.ready and est.trace_cov == pytest.approx(52.0) and est.grad_sq == pytest.approx(0.25)
    assert c.lr_factor() == pytest.approx(adascale_gain(64, 16, 0.25, 52.0))


# -- the decision cadence ----------------------------------------------------------------------
def test_decisions_come_every_decide_every_steps_and_stay_in_bounds() -> None:
    policy = _Script([40, 40, 2000, 1])
    c = _controller(policy, decide_every=3)
    assert c.maybe_decide() is None  # nothing observed yet
    got = [_step(c, step) for step in range(1, 13)]
    # Steps 3, 6, 9, 12 decide: 40 (new), 40 (same: None), 2000 -> max 512, 1 -> min 8.
    assert got == [None, None, 40, None, None, None, None, None, 512, None, None, 8]
    assert [ctx.step for ctx in policy.seen] == [3, 6, 9, 12]
    assert [ctx.batch_size for ctx in policy.seen] == [16, 40, 40, 512]
    assert c.num_decisions == 4 and c.batch_size == 8
    ctx = policy.seen[1]
    assert (ctx.epoch, ctx.samples) == (6 * 40 / 1000, 6 * 40)
    assert (ctx.base_batch_size, ctx.min_batch_size, ctx.max_batch_size) == (16, 8, 512)


def test_the_context_carries_the_estimate_and_median_step_times() -> None:
    est = GradientNoiseScale(smoothing=None, min_updates=2)
    policy = _Script()
    c = _controller(policy, estimator=est, decide_every=2, max_micro_batch_size=12)
    _step(c, 1, _norms([3.0, 3.0], 8, 2.0, 16), seconds=0.1)  # tr 16, |G|^2 1
    _step(c, 2, _norms([5.0], 8, 3.0, 16), seconds=0.3)  # tr 32, |G|^2 1
    ctx = policy.seen[-1]
    assert ctx.noise_ready and (ctx.grad_sq_mean, ctx.trace_cov, ctx.noise_scale) == pytest.approx((1.0, 24.0, 24.0))
    assert ctx.step_time_s == {16: pytest.approx(0.2)}  # median of 0.1 and 0.3
    assert ctx.max_micro_batch_size == 12
    # A step of another size than B (an epoch's short tail) is not timed.
    c.observe(step=3, epoch=0.05, samples=40, batch_size=8, step_time_s=9.0)
    assert c.context().step_time_s == {16: pytest.approx(0.2)}


# -- out of memory -----------------------------------------------------------------------------
def test_on_oom_halves_the_micro_cap_and_keeps_b() -> None:
    c = _controller(_Script([64]))
    _step(c, 1)
    assert c.micro_sizes(64) == [32, 32]
    assert c.on_oom(32) == 16
    assert c.batch_size == 64 and c.max_micro_batch_size == 16
    assert c.micro_sizes(64) == [16, 16, 16, 16]  # the same 64 examples, more accumulation
    assert c.on_oom(3) == 1
    assert c.micro_sizes(5) == [1] * 5
    with pytest.raises(RuntimeError, match=r"a single example ran out of memory \(micro_batch_size=1\)"):
        c.on_oom(1)
    assert c.batch_size == 64 and c.state_dict()["max_micro_batch_size"] == 1


# -- checkpoints -------------------------------------------------------------------------------
def _gns_controller() -> BatchSizeController:
    # Confidence 0 and no rounding or hysteresis: the policy moves B to the noise scale itself
    # (at most 2x per decision), so the decisions are easy to follow by hand.
    return _controller(
        GNSPolicy(confidence=0.0, round_to=1, hysteresis=0.0),
        AdaScaleScaling(),
        GradientNoiseScale(smoothing=None, min_updates=2),
        min_batch_size=16, max_batch_size=1024, decide_every=2, max_lr_factor=3.0,
    )


def test_state_dict_round_trip_restores_the_decisions() -> None:
    c = _gns_controller()
    _step(c, 1, _norms([3.0, 3.0], 8, 2.0, 16), seconds=0.1)  # tr 16, |G|^2 1
    assert _step(c, 2, _norms([5.0], 8, 3.0, 16), seconds=0.3) == 24  # tr 32: noise 24
    c.on_oom(12)
    state = pickle.loads(pickle.dumps(c.state_dict()))  # a checkpoint file holds it pickled

    restored = _gns_controller()
    restored.load_state_dict(state)
    assert (restored.batch_size, restored.num_decisions, restored.max_micro_batch_size) == (24, 1, 6)
    assert restored.context() == c.context()
    # AdaScale at B=24 from B0=16 with tr 24, |G|^2 1: s2 = 1.5, S = 1.5 -> 2.5 / 2 = 1.25.
    assert restored.lr_factor() == c.lr_factor() == pytest.approx(1.25)
    assert restored.micro_sizes(24) == [6, 6, 6, 6]

    # The next steps (b=12 of B=24: tr = 24 (|G_b|^2 - |G_B|^2), |G|^2 = |G_B|^2 - tr/24) give
    # tr 96, |G|^2 1 twice: the mean noise is (16+32+96+96)/4 = 60, and from 24 the policy may
    # grow to 48 at most. The restored controller decides exactly as the original does.
    for ctrl in (c, restored):
        assert _step(ctrl, 3, _norms([9.0], 12, 5.0, 24)) is None
        assert _step(ctrl, 4, _norms([9.0], 12, 5.0, 24)) == 48
        assert ctrl.estimator.noise_scale == pytest.approx(60.0)
    assert restored.state_dict() == c.state_dict()
    # Without the state the same steps decide otherwise (from B0 = 16, noise 96: 32).
    fresh = _gns_controller()
    _step(fresh, 3, _norms([9.0], 12, 5.0, 24))
    assert _step(fresh, 4, _norms([9.0], 12, 5.0, 24)) == 32


@pytest.mark.parametrize(("saved_cap", "own_cap", "cap"), [(6, None, 6), (None, 4, 4), (6, 4, 4), (3, 4, 3)])
def test_a_restored_controller_keeps_its_own_bounds_and_the_smaller_micro_batch_cap(saved_cap, own_cap, cap) -> None:
    state = {**_controller().state_dict(), "batch_size": 256, "max_micro_batch_size": saved_cap}
    restored = _controller(max_batch_size=64, max_micro_batch_size=own_cap)
    with pytest.warns(UserWarning, match=r"the checkpoint's batch size 256 is outside this run's bounds "
                      r"\(min_batch_size=8, max_batch_size=64\); resuming at 64 from the first resumed step"):
        restored.load_state_dict(state)
    assert (restored.batch_size, restored.max_micro_batch_size) == (64, cap)
    state["batch_size"] = 4  # below min_batch_size=8
    with pytest.warns(UserWarning, match=r"the checkpoint's batch size 4 is outside .* resuming at 8"):
        restored.load_state_dict(state)
    assert restored.batch_size == 8


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((32, 16, 64), (r"1 <= min_batch_size <= base_batch_size <= max_batch_size \(got min_batch_size=32, "
                        r"base_batch_size=16, max_batch_size=64\)")),
        ((8, 16, 12), r"got min_batch_size=8, base_batch_size=16, max_batch_size=12"),
    ],
)
def test_bad_bounds_are_rejected(bounds: tuple[int, int, int], message: str) -> None:
    lo, b0, hi = bounds
    with pytest.raises(ValueError, match=message):
        _controller(min_batch_size=lo, base_batch_size=b0, max_batch_size=hi)
    with pytest.raises(ValueError, match=r"decide_every must be >= 1 \(got decide_every=0\)"):
        _controller(decide_every=0)
