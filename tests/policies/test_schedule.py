"""The ``schedule`` policy (the user's LR decay turned into batch growth) and the optimizer
settings that keep Adam's state per example (``scale_betas``, ``scale_weight_decay``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autobatch
from autobatch.policies import PolicyContext, SchedulePolicy
from autobatch.scaling import LinearScaling, SqrtScaling
from autobatch.train.callbacks import Callback

PEAK, B0 = 0.01, 16


def _step_decay(opt):  # the LR halves every 4 ticks of the clock (a tick: B0 examples)
    return torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)


def _scheduled(clock: int) -> float:
    return PEAK * 0.5 ** (clock // 4)


def _fit(regression, mse, *, optimizer=torch.optim.Adam, scaling=None, max_steps=10, **kwargs):
    x, y = regression(n=2048)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    kwargs.setdefault("policy", SchedulePolicy(noise_bound=False, hysteresis=0.0))
    kwargs.setdefault("lr_scheduler", _step_decay)
    result = autobatch.fit(model, (x, y), loss_fn=mse, optimizer=optimizer, lr=PEAK, max_steps=max_steps,
                           initial_batch_size=B0, decide_every=1, lr_scaling=scaling, progress=False, **kwargs)
    return model, result


def test_a_step_decay_becomes_the_expected_batch_and_lr(regression, mse) -> None:
    # Adam, square-root rule (Seesaw): each halving of the schedule doubles B at the next
    # decision and the LR is the schedule's x sqrt(B/B0); SGD, linear rule: the LR stays at
    # the peak wherever B caught up with the decay.
    for optimizer, scaling, rule in ((torch.optim.Adam, SqrtScaling(cap_at_noise_scale=False), math.sqrt),
                                     (torch.optim.SGD, LinearScaling(cap_at_noise_scale=False), lambda r: r)):
        _, res = _fit(regression, mse, optimizer=optimizer, scaling=scaling)
        h = res.history
        # by hand: the clock is samples // B0 before the step; the decision after step t sees
        # the decay of step t's schedule and asks for B0 / decay, at most 2x per decision
        assert [r.batch_size for r in h] == [16, 16, 16, 16, 16, 32, 32, 32, 64, 64]
        for r in h:
            clock = (r.samples - r.examples) // B0
            assert r.base_lr == pytest.approx(_scheduled(clock))
            assert r.lr == pytest.approx(_scheduled(clock) * rule(r.batch_size / B0))
        assert h[5].lr == pytest.approx(PEAK / 2 * rule(2))  # step 6: schedule 0.005, B 32
    # with max_lr_factor=1 the linear rule's factor 2 is allowed: the LR stays at the peak
    _, res = _fit(regression, mse, optimizer=torch.optim.SGD, scaling=LinearScaling(cap_at_noise_scale=False),
                  max_lr_factor=1.0)
    assert res.history[5].lr == pytest.approx(PEAK)


def test_a_schedule_without_decay_is_left_as_written(regression, mse) -> None:
    # warm-up then constant: the decay never falls below 1, so the run is the fixed policy's
    def warm_constant(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 5))

    runs = []
    for policy in (SchedulePolicy(), "fixed"):
        model, res = _fit(regression, mse, policy=policy, lr_scheduler=warm_constant, max_steps=30)
        runs.append((model, [(r.batch_size, r.lr) for r in res.history]))
    (a, steps_a), (b, steps_b) = runs
    assert steps_a == steps_b and {s[0] for s in steps_a} == {B0}
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_the_noise_scale_bounds_the_growth() -> None:
    policy = SchedulePolicy(hysteresis=0.0)
    ctx = PolicyContext(step=10, epoch=0.1, samples=160, batch_size=16, base_batch_size=16, min_batch_size=1,
                        max_batch_size=4096, noise_scale=40.0, noise_ready=True, lr_decay=0.1)
    assert policy.wanted(ctx) == pytest.approx(160.0)
    assert policy.propose(ctx) == 32  # at most 2x per decision
    ctx.batch_size = 32
    assert policy.propose(ctx) == 40  # the noise scale (40) binds before the schedule's 160
    ctx.noise_ready = False
    assert policy.propose(ctx) == 32  # no estimate yet: the batch stays


def test_a_resume_mid_conversion_is_bit_exact(regression, mse, tmp_path) -> None:
    full_model, full = _fit(regression, mse, max_steps=12)
    _fit(regression, mse, max_steps=7, checkpoint_dir=tmp_path, checkpoint_every=1)  # B already grew
    x, y = regression(n=2048)
    torch.manual_seed(123)  # nothing of this run's RNG may leak into the resumed one
    model = nn.Linear(8, 1)
    resumed = autobatch.fit(model, (x, y), loss_fn=mse, optimizer=torch.optim.Adam, lr=PEAK, max_steps=12,
                            initial_batch_size=B0, decide_every=1, progress=False, lr_scheduler=_step_decay,
                            policy=SchedulePolicy(noise_bound=False, hysteresis=0.0), checkpoint_dir=tmp_path,
                            resume=True)
    assert [(r.batch_size, r.lr) for r in resumed.history] == [(r.batch_size, r.lr) for r in full.history]
    assert torch.equal(model.weight, full_model.weight) and torch.equal(model.bias, full_model.bias)


def test_the_policy_needs_a_scheduler(regression, mse) -> None:
    x, y = regression(n=64)
    with pytest.raises(ValueError, match=r"policy='schedule' grows the batch where lr_scheduler decays"):
        autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, lr=0.1, epochs=1, policy="schedule", progress=False)


class _GroupLog(Callback):
    def __init__(self) -> None:
        self.opt: torch.optim.Optimizer | None = None
        self.groups: list[tuple[int, tuple[float, float], float]] = []

    def on_step_end(self, record) -> None:
        group = self.opt.param_groups[0]
        self.groups.append((record.batch_size, tuple(group["betas"]), group["weight_decay"]))


@pytest.mark.parametrize("betas", ["beta2", "both"])
def test_betas_and_weight_decay_follow_the_batch_per_example(betas: str, regression, mse) -> None:
    x, y = regression(n=2048)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK, betas=(0.9, 0.999), weight_decay=0.1)
    log = _GroupLog()
    log.opt = opt
    autobatch.fit(model, (x, y), loss_fn=mse, optimizer=opt, max_steps=10, initial_batch_size=B0, decide_every=1,
                  policy=SchedulePolicy(noise_bound=False, hysteresis=0.0), lr_scheduler=_step_decay,
                  lr_scaling=SqrtScaling(cap_at_noise_scale=False), scale_betas=betas, scale_weight_decay=True,
                  callbacks=[log], progress=False)
    assert {b for b, _, _ in log.groups} == {16, 32, 64}
    for b, (beta1, beta2), wd in log.groups:
        r = b / B0
        assert beta2 == pytest.approx(0.999**r) and beta1 == pytest.approx(0.9**r if betas == "both" else 0.9)
        assert wd == pytest.approx(0.1 * r / math.sqrt(r))  # per example: wd x (B/B0) / the sqrt rule's factor


def test_scaling_what_the_optimizer_lacks_is_refused(regression, mse) -> None:
    x, y = regression(n=64)
    with pytest.raises(ValueError, match=r"scale_betas='both' scales Adam's betas, but SGD's param groups hold none"):
        autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, optimizer=torch.optim.SGD, lr=0.1, epochs=1,
                      scale_betas="both", progress=False)
