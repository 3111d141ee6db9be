"""The budget policy (autobatch/policies/budget.py) and its loss-spike guard (guard.py): the
guard against sequences computed by hand, the batch cap, the anneal, and what the controller
and fit tell the policy."""

from __future__ import annotations

import math

import pytest

from autobatch.policies import BudgetPolicy, LossSpikeGuard, PolicyContext
from autobatch.policies.budget import largest_batch_within
from autobatch.run_length import RunLength
from autobatch.scaling import LinearScaling, SqrtScaling


def _ctx(**kw: object) -> PolicyContext:
    base = {
        "step": 100, "epoch": 1.0, "samples": 3200, "batch_size": 32, "base_batch_size": 32,
        "min_batch_size": 32, "max_batch_size": 4096, "noise_scale": 500.0, "noise_ready": True,
        "noise_scale_stderr": 0.0, "max_lr_factor": 2.0, "lr_rule": lambda b: b / 32,
    }
    base.update(kw)
    return PolicyContext(**base)  # type: ignore[arg-type]


# -- the guard, against sequences computed by hand ----------------------------------------------
def test_guard_fires_on_a_rise_above_the_running_minimum() -> None:
    g = LossSpikeGuard(spike_ratio=1.5, smoothing=0.0, min_updates=1)  # EMA = the loss itself
    # min becomes 1.0, 0.8, 0.8; 0.9 <= 1.5 * 0.8 = 1.2; 1.3 > 1.2 fires: allowed = 2 * 0.5 = 1
    assert [g.update(x, 2.0) for x in (1.0, 0.8, 0.9, 1.3)] == [False, False, False, True]
    assert g.allowed == 1.0 and g.spikes == 1
    # the minimum restarts at 1.3: 1.9 <= 1.95 does not fire, 2.0 > 1.95 would but the factor
    # in use is 1 (nothing to cut)
    assert [g.update(x, 1.0) for x in (1.9, 2.0)] == [False, False]
    assert g.allowed == 1.0


def test_guard_uses_the_bias_corrected_ema_and_waits_for_min_updates() -> None:
    g = LossSpikeGuard(spike_ratio=1.5, smoothing=0.5, min_updates=2)
    # EMA: 1 -> 1 -> 4 clipped at 3 x 1: (0.5*0.75 + 0.5*3) / 0.875 = 2.143 > 1.5 * 1 fires
    assert g.update(1.0, 4.0) is False  # before min_updates: never
    assert g.update(1.0, 4.0) is False
    assert g.update(4.0, 4.0) is True
    assert g.smoothed_loss == pytest.approx(1.875 / 0.875)
    assert g.allowed == 2.0  # 4 * 0.5
    g2 = LossSpikeGuard(spike_ratio=1.5, smoothing=0.0, min_updates=5)
    assert [g2.update(x, 2.0) for x in (1.0, 9.0, 9.0, 9.0)] == [False] * 4  # too early
    assert g2.allowed == math.inf


def test_guard_clips_a_single_outlier() -> None:
    # 20 losses of 1 at smoothing 0.95: sum = weight = 1 - 0.95^20 = 0.6415. Then one batch at
    # 100, clipped to 3: (0.95 * 0.6415 + 0.05 * 3) / (0.95 * 0.6415 + 0.05) = 1.152 < 1.5;
    # unclipped it would be 8.5 and fire.
    for clip, fires in ((3.0, False), (math.inf, True)):
        g = LossSpikeGuard(smoothing=0.95, min_updates=1, outlier_clip=clip)
        assert not any(g.update(1.0, 2.0) for _ in range(20))
        assert g.update(100.0, 2.0) is fires
    w = 1 - 0.95**20
    g = LossSpikeGuard(smoothing=0.95, min_updates=1)
    for _ in range(20):
        g.update(1.0, 2.0)
    g.update(100.0, 2.0)
    assert g.smoothed_loss == pytest.approx((0.95 * w + 0.15) / (0.95 * w + 0.05))


def test_guard_cuts_repeatedly_but_never_below_one_and_ignores_nan() -> None:
    g = LossSpikeGuard(spike_ratio=1.5, smoothing=0.0, min_updates=1)
    losses, factors = (1.0, 2.0, 3.5, 6.0), (8.0, 8.0, 4.0, 2.0)
    fired = [g.update(x, f) for x, f in zip(losses, factors)]
    # 2 > 1.5 (8 -> 4), min 2: 3.5 > 3 (4 -> 2), min 3.5: 6 > 5.25 (2 -> 1)
    assert fired == [False, True, True, True] and g.allowed == 1.0
    assert g.update(math.nan, 2.0) is False and g.smoothed_loss == 6.0


def test_guard_state_round_trip_and_bad_settings() -> None:
    g = LossSpikeGuard(smoothing=0.0, min_updates=1)
    for x in (1.0, 2.0):
        g.update(x, 2.0)
    h = LossSpikeGuard(smoothing=0.0, min_updates=1)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict() and h.allowed == 1.0
    with pytest.raises(ValueError, match=r"spike_ratio must be > 1 \(got spike_ratio=1.0\).*cut must be in"):
        LossSpikeGuard(spike_ratio=1.0, cut=1.0)


# -- the batch cap ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "factor", "expected"),
    [(LinearScaling(), 2.0, 64), (SqrtScaling(), 2.0, 128), (LinearScaling(), 1.0, 32),
     (LinearScaling(), 1.5, 48), (SqrtScaling(), 3.0, 288)],
)
def test_largest_batch_within_matches_the_closed_form(rule, factor: float, expected: int) -> None:
    # linear: B0 x F; sqrt: B0 x F^2 (B0 = 32)
    assert largest_batch_within(lambda b: rule.factor(b, 32), factor, 32, 4096) == expected
    brute = max(b for b in range(32, 4097) if rule.factor(b, 32) <= factor + 1e-9)
    assert expected == brute


def test_largest_batch_within_edges() -> None:
    assert largest_batch_within(lambda b: 1.0, 2.0, 32, 4096) == 4096  # no LR growth: no cap
    assert largest_batch_within(lambda b: b / 8, 2.0, 32, 4096) == 32  # nothing fits: lo


def test_budget_caps_the_batch_at_what_the_lr_can_follow_under_a_sample_budget() -> None:
    p = BudgetPolicy(guard=False)
    # gns alone would double 32 -> 64 -> 128 (noise scale 500); the linear factor caps at 2
    b = 32
    for _ in range(4):
        b = p.propose(_ctx(batch_size=b))
    assert b == 64
    assert p.lr_factor(_ctx(batch_size=64)) == 1.0
    # with the square-root rule, F = 2 allows 4 x B0
    b = 32
    for _ in range(4):
        b = p.propose(_ctx(batch_size=b, lr_rule=lambda x: math.sqrt(x / 32)))
    assert b == 128
    # a steps budget: B follows the noise scale (500 = 62.5 x 8, ties round up to 504)
    b = 32
    for _ in range(6):
        b = p.propose(_ctx(batch_size=b, limited_by="steps"))
    assert b == 504


def test_budget_guard_cut_lowers_the_lr_at_once_and_the_batch_at_the_next_decision() -> None:
    guard = LossSpikeGuard(spike_ratio=1.5, smoothing=0.0, min_updates=1)
    p = BudgetPolicy(guard=guard)
    p.observe(_ctx(step=1, batch_size=64, train_loss=1.0))
    assert p.lr_factor(_ctx(step=1, batch_size=64, train_loss=1.0)) == 1.0
    # reading the LR factor feeds nothing: a spiking loss in the context changes no state
    assert p.lr_factor(_ctx(step=2, batch_size=64, train_loss=2.0)) == 1.0 and guard.spikes == 0
    # a spike observed at B = 64 (factor 2 in use): allowed 1, so the LR factor 2 is halved
    p.observe(_ctx(step=2, batch_size=64, train_loss=2.0))
    assert p.lr_factor(_ctx(step=2, batch_size=64, train_loss=2.0)) == 0.5
    assert guard.spikes == 1
    # the same step seen again (observe_loss from a callback too) does not feed the guard twice
    p.observe_loss(2, 2.0, 2.0)
    assert p.propose(_ctx(step=2, batch_size=64, train_loss=2.0)) == 32
    assert guard.spikes == 1 and p.state_dict()["seen_step"] == 2


def test_what_limits_a_run() -> None:
    assert RunLength(40, None, None).limited_by == "samples"
    assert RunLength(None, None, 10_000).limited_by == "samples"
    assert RunLength(None, 500, None).limited_by == "steps"
    assert RunLength(40, 500, None).limited_by == "samples"


def test_the_controller_gives_the_policy_budget_loss_cap_and_rule() -> None:
    from autobatch.noise import GradientNoiseScale
    from autobatch.train.controller import BatchSizeController

    guard = LossSpikeGuard(spike_ratio=1.5, smoothing=0.0, min_updates=1)
    c = BatchSizeController(policy=BudgetPolicy(guard=guard), scaling=LinearScaling(),
                            estimator=GradientNoiseScale(), base_batch_size=32, min_batch_size=32,
                            max_batch_size=1024, max_lr_factor=2.0, limited_by="steps")
    c.batch_size = 64  # as if the policy had grown it
    c.observe(step=1, epoch=0.1, samples=64, batch_size=64, loss=1.0)
    ctx = c.context()
    assert (ctx.limited_by, ctx.train_loss, ctx.max_lr_factor) == ("steps", 1.0, 2.0)
    assert ctx.lr_rule is not None and ctx.lr_rule(64) == 2.0 and ctx.lr_rule(256) == 8.0  # no noise yet: no cap
    assert c.lr_factor() == 2.0
    c.observe(step=2, epoch=0.2, samples=128, batch_size=64, loss=2.0)  # a spike at factor 2
    assert c.lr_factor() == 1.0 and guard.allowed == 1.0


# -- annealing by batch once the LR has found its edge ------------------------------------------
def test_guard_is_calm_only_near_the_lowest_average_of_the_run() -> None:
    g = LossSpikeGuard(spike_ratio=1.5, smoothing=0.0, min_updates=2)  # EMA = the loss itself
    g.update(1.0, 2.0)
    assert not g.calm()  # before min_updates
    g.update(0.5, 2.0)
    assert g.calm()  # 0.5 <= 1.5 x 0.5
    assert g.update(0.9, 2.0)  # 0.9 > 1.5 x 0.5: a spike; the running minimum restarts at 0.9...
    assert not g.calm()  # ...but calm compares with the run's best, 0.5: 0.9 > 0.75
    g.update(0.76, 1.0)
    assert not g.calm()
    g.update(0.75, 1.0)
    assert g.calm()  # recovered to 1.5 x the best
    h = LossSpikeGuard(spike_ratio=1.5, smoothing=0.0, min_updates=2)
    h.load_state_dict(g.state_dict())
    h.update(0.8, 1.0)
    assert not h.calm()  # the best (0.5) came back with the state


def _spiked_policy(anneal_after: float | None = 0.5) -> BudgetPolicy:
    guard = LossSpikeGuard(spike_ratio=1.5, smoothing=0.0, min_updates=1)
    p = BudgetPolicy(guard=guard, anneal_after=anneal_after)
    p.observe(_ctx(step=1, batch_size=64, train_loss=1.0))
    p.observe(_ctx(step=2, batch_size=64, train_loss=2.0))  # a spike at factor 2: allowed 1
    p.observe(_ctx(step=3, batch_size=32, train_loss=1.0))  # recovered: calm again
    assert guard.spikes == 1 and guard.allowed == 1.0 and guard.calm()
    return p


def _decide(p: BudgetPolicy, ctx: PolicyContext) -> int:
    """What the controller does at a decision step: the policy observes the step, then proposes."""
    p.observe(ctx)
    return p.propose(ctx)


@pytest.mark.parametrize(("progress", "loss", "budget", "anneal_after", "expected"), [
    (0.4, 1.0, "samples", 0.5, 32),  # before the anneal: the batch the LR can follow (F = 1)
    (math.nan, 1.0, "samples", 0.5, 32),  # progress unknown: never anneals
    (0.6, 1.0, "samples", None, 32),  # annealing switched off
    (0.6, 1.6, "samples", 0.5, 32),  # a spike being recovered from (1.6 > 1.5 x 1): not calm
    (0.6, 1.0, "samples", 0.5, 64),  # calm, past half the budget: B follows the noise scale
])
def test_budget_anneals_by_batch_only_after_a_cut_past_anneal_after_and_while_calm(
        progress: float, loss: float, budget: str, anneal_after: float | None, expected: int) -> None:
    p = _spiked_policy(anneal_after)
    ctx = _ctx(step=4, batch_size=32, train_loss=loss, progress=progress, limited_by=budget)
    assert _decide(p, ctx) == expected  # gns moves 32 -> 64 (max_growth 2) towards 500
    if expected == 64:
        # the LR stays at what the guard allows: the rule's factor 2 at B = 64 is divided by 2
        assert p.lr_factor(_ctx(step=5, batch_size=64, train_loss=1.0, progress=0.6)) == 0.5
        assert _decide(p, _ctx(step=6, batch_size=64, train_loss=1.0, progress=0.6)) == 128


def test_budget_without_a_spike_does_not_anneal() -> None:
    p = BudgetPolicy(guard=LossSpikeGuard(smoothing=0.0, min_updates=1))
    b = 32
    for step in range(1, 6):
        b = _decide(p, _ctx(step=step, batch_size=b, train_loss=1.0, progress=0.9))
    assert b == 64  # the LR can follow up to F = 2: no edge found, no LR decay by batch


def test_anneal_after_is_checked() -> None:
    with pytest.raises(ValueError, match=r"anneal_after must be in \[0, 1\] or None \(got anneal_after=1.5\)"):
        BudgetPolicy(anneal_after=1.5)


def test_controller_progress_is_the_fraction_of_the_run_done() -> None:
    from autobatch.noise import GradientNoiseScale
    from autobatch.run_length import RunLength
    from autobatch.train.controller import BatchSizeController

    assert RunLength(2.5, None, None).length(400) == 1000  # epochs x examples
    assert RunLength(2.5, None, 600).length(400) == 600  # the smaller limit binds
    assert RunLength(None, 50, None).length(400) == 50  # steps
    for limit, total, expected in (("samples", 1000.0, 0.64), ("steps", 50.0, 0.2), ("samples", None, math.nan)):
        c = BatchSizeController(policy=BudgetPolicy(), scaling=LinearScaling(), estimator=GradientNoiseScale(),
                                base_batch_size=32, min_batch_size=32, max_batch_size=1024, limited_by=limit,
                                run_length=total)
        c.observe(step=10, epoch=1.6, samples=640, batch_size=64)
        assert c.context().progress == pytest.approx(expected, nan_ok=True)


def test_fit_tells_the_policy_how_far_through_its_budget_it_is() -> None:
    import torch

    import autobatch
    from autobatch.policies import BatchSizePolicy

    class Record(BatchSizePolicy):
        def __init__(self) -> None:
            self.seen: list[tuple[int, float]] = []

        def propose(self, ctx: PolicyContext) -> int:
            self.seen.append((ctx.samples, ctx.progress))
            return ctx.batch_size

    torch.manual_seed(0)
    x, y = torch.randn(100, 3), torch.randn(100, 1)
    policy = Record()
    autobatch.fit(torch.nn.Linear(3, 1), (x, y), loss_fn=torch.nn.functional.mse_loss, lr=0.01, epochs=3,
                  initial_batch_size=10, policy=policy, gns_method="off", lr_scaling="none", progress=False,
                  decide_every=1)
    assert policy.seen and all(p == pytest.approx(s / 300) for s, p in policy.seen)
    assert policy.seen[-1][1] == pytest.approx(1.0)


def test_budget_anneal_stops_at_anneal_factor_times_the_followed_batch_and_drops_back_on_a_spike() -> None:
    p = _spiked_policy()  # the guard allows factor 1: the LR follows B0 = 32 only
    b, step = 32, 4
    sizes = []
    for _ in range(5):
        b = _decide(p, _ctx(step=step, batch_size=b, train_loss=1.0, progress=0.7, noise_scale=5000.0))
        sizes.append(b)
        step += 1
    assert sizes == [64, 128, 256, 256, 256]  # x2 per decision up to 8 x 32, whatever the noise scale
    # a loss 1.6x the run's best: not calm, back to the batch the LR can follow at once
    assert _decide(p, _ctx(step=step, batch_size=256, train_loss=1.6, progress=0.7)) == 32


def test_budget_leaves_the_decay_to_a_users_lr_scheduler() -> None:
    p = _spiked_policy()
    ctx = _ctx(step=4, batch_size=32, train_loss=1.0, progress=0.7)
    p.observe(ctx)
    assert p.annealing(ctx)
    ctx.lr_scheduled = True
    assert not p.annealing(ctx) and p.propose(ctx) == 32


def test_fit_tells_the_policy_about_a_users_lr_scheduler() -> None:
    import torch

    import autobatch
    from autobatch.policies import BatchSizePolicy

    class Record(BatchSizePolicy):
        def __init__(self) -> None:
            self.seen: set[bool] = set()

        def propose(self, ctx: PolicyContext) -> int:
            self.seen.add(ctx.lr_scheduled)
            return ctx.batch_size

    x, y = torch.randn(100, 3), torch.randn(100, 1)
    for scheduler, expected in ((None, {False}), (lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5), {True})):
        policy = Record()
        autobatch.fit(torch.nn.Linear(3, 1), (x, y), loss_fn=torch.nn.functional.mse_loss, lr=0.01, epochs=1,
                      initial_batch_size=10, policy=policy, gns_method="off", lr_scaling="none", progress=False,
                      decide_every=1, lr_scheduler=scheduler)
        assert policy.seen == expected
