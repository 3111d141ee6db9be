"""StepNormMeter: which steps it measures, and its norms against brute-force gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autobatch.train.sampler import split_sizes
from autobatch.train.step_norms import MeasureSchedule, StepNormMeter, norms_from_totals


def _micro_sizes(cap: int | None):
    def sizes(n: int, min_parts: int = 1) -> list[int]:
        return split_sizes(n, max(min(min_parts, n), math.ceil(n / (cap or n))))
    return sizes


def _problem(noise_data, n: int = 12):
    x, y = noise_data(n, 5, 0)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)), x, y


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = ((model(x) - y) ** 2).mean()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def _run_step(meter: StepNormMeter, model, x, y, step: int, cap: int | None = None):
    """One step of ``step`` (its number, from 1): ``(sizes, mean loss, norms)`` as the meter reads them."""
    sizes = meter.split(step, len(x), _micro_sizes(cap))
    model.zero_grad(set_to_none=True)
    meter.begin_step(sizes)
    loss = torch.zeros(())
    for xi, yi in zip(x.split(sizes), y.split(sizes)):
        weighted = ((model(xi) - yi) ** 2).mean() * (len(xi) / len(x))
        weighted.backward()
        meter.after_backward(len(xi), len(xi) / len(x))
        loss = loss + weighted.detach()
    mean, norms, extra = meter.read(meter.local_totals(loss, sizes, len(x)).tensors, len(x))
    assert extra == []  # one process: nothing else rides along
    return sizes, mean, norms


def test_norms_from_totals_averages_every_small_batch() -> None:
    norms = norms_from_totals(12.0, 3.0, 1 / 2 + 1 / 2 + 1 / 3, 6.0, 7, grad_scale=2.0)
    assert norms.small_sq_norms == [1.0] and norms.big_sq_norm == 1.5 and norms.big_batch_size == 7
    assert norms.small_batch_size == pytest.approx(3 / (1 / 2 + 1 / 2 + 1 / 3))
    assert norms_from_totals(5.0, 1.0, 1.0, 2.0, 7) is None  # one small batch: nothing smaller


def test_micro_meter_measures_every_kth_step_split_in_two_and_its_norms_are_exact(noise_data) -> None:
    model, x, y = _problem(noise_data, 12)
    meter = StepNormMeter(model, "micro", every=4, first=2)
    plan = []
    for step in range(1, 10):
        sizes, loss, norms = _run_step(meter, model, x, y, step)
        plan.append((sizes, len(norms.small_sq_norms)))
        assert loss == pytest.approx(((model(x) - y) ** 2).mean().item(), rel=1e-5)
        # every step reads the whole step's norm
        assert norms.big_sq_norm == pytest.approx(_grad(model, x, y).square().sum().item(), rel=1e-5)
    measured = [1, 2, 5, 9]  # the first two, then every fourth
    assert plan == [([6, 6], 1) if s in measured else ([12], 0) for s in range(1, 10)]
    halves = [_grad(model, x[:6], y[:6]), _grad(model, x[6:], y[6:])]
    assert norms.small_sq_norms[0] == pytest.approx(sum(h.square().sum().item() for h in halves) / 2, rel=1e-5)
    assert norms.small_batch_size == 6
    assert norms.big_sq_norm == pytest.approx(_grad(model, x, y).square().sum().item(), rel=1e-5)
    meter.remove()


def test_a_step_split_by_the_memory_cap_is_measured_for_free(noise_data) -> None:
    model, x, y = _problem(noise_data, 12)
    meter = StepNormMeter(model, "micro", every=100)
    sizes, _, norms = _run_step(meter, model, x, y, step=4, cap=5)  # not due, but split anyway
    assert sizes == [4, 4, 4] and norms is not None
    thirds = [_grad(model, x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
    assert norms.small_sq_norms[0] == pytest.approx(sum(t.square().sum().item() for t in thirds) / 3, rel=1e-5)
    assert norms.small_batch_size == 4
    meter.remove()


def test_per_example_meter_matches_brute_force_and_sleeps_between_measurements(noise_data) -> None:
    model, x, y = _problem(noise_data, 8)
    meter = StepNormMeter(model, "per_example", every=3)
    sizes, _, norms = _run_step(meter, model, x, y, step=1)
    assert sizes == [8] and norms.small_batch_size == 1.0
    per_example = [_grad(model, x[i:i + 1], y[i:i + 1]).square().sum().item() for i in range(8)]
    assert norms.small_sq_norms[0] == pytest.approx(sum(per_example) / 8, rel=1e-5)
    for step in (2, 3):  # unmeasured: the hooks record nothing, so nothing is left pending
        assert _run_step(meter, model, x, y, step)[2].small_sq_norms == []
    assert _run_step(meter, model, x, y, 4)[2].small_sq_norms != []
    meter.remove()


def test_off_meter_reads_only_the_loss(noise_data) -> None:
    model, x, y = _problem(noise_data, 8)
    meter = StepNormMeter(model, "off", every=1)
    sizes, loss, norms = _run_step(meter, model, x, y, step=1)
    assert sizes == [8] and norms is None
    assert loss == pytest.approx(((model(x) - y) ** 2).mean().item(), rel=1e-5)


def test_auto_schedule_keeps_the_splits_within_the_overhead_and_the_memory_in_measurements() -> None:
    sched = MeasureSchedule("auto", overhead=0.05, base_batch=16, smoothing=0.95)
    assert sched.interval(16) == MeasureSchedule.DEFAULT_EVERY  # not calibrated yet
    for _ in range(6):  # the first window's split steps (warm-up): not counted
        sched.observe(16, 9.9e-3, split_to_measure=True)
    for _ in range(8):  # unsplit steps at 1.0 ms...
        sched.observe(16, 1.0e-3, split_to_measure=False)
    for _ in range(2):  # ...among which split ones at 1.9 ms: a split costs 0.9 of a step
        sched.observe(16, 1.9e-3, split_to_measure=True)
    assert sched.split_cost is None  # two split steps are not enough
    sched.observe(16, 1.9e-3, split_to_measure=True)
    assert sched.split_cost == pytest.approx(0.9)
    # 0.9 / 2^k <= 5%: k = 5; at B = 64 the cost halves (sqrt(16/64)): k = 4; never below 8
    assert [sched.interval(b) for b in (16, 64, 256, 4096)] == [32, 16, 8, 8]
    assert all(sched.split_cost * (16 / b) ** 0.5 / sched.interval(b) <= 0.05 for b in (16, 64, 256, 4096))
    # The decay between two measurements stays that of every 8th step at 0.95.
    assert sched.smoothing(16) ** 32 == pytest.approx(0.95**8)
    assert sched.smoothing(4096) == 0.95
    sched.observe(16, 5.0, split_to_measure=True)  # calibrated once: later times change nothing
    assert sched.split_cost == pytest.approx(0.9)
    # The policy moved B before any unsplit step at B0: the calibration compares steps at the
    # batch they share, referred to B0 (a split at 64 costs 0.45 = 0.9 x sqrt(16/64)).
    moved = MeasureSchedule("auto", overhead=0.05, base_batch=16)
    for _ in range(12):
        moved.observe(16, 1.9e-3, split_to_measure=True)
    for _ in range(8):
        moved.observe(64, 2.0e-3, split_to_measure=False)
    assert moved.split_cost is None  # no split step at 64 yet
    for _ in range(3):
        moved.observe(64, 2.9e-3, split_to_measure=True)
    assert moved.split_cost == pytest.approx(0.9) and moved.interval(64) == 16
    again = MeasureSchedule("auto", overhead=0.05, base_batch=16)
    again.load_state_dict(sched.state_dict())
    assert again.interval(16) == 32
    assert MeasureSchedule(3).interval(16) == 3 and MeasureSchedule(3).smoothing(16) == 0.95
    with pytest.raises(ValueError, match="every must be an int >= 1 or 'auto'"):
        MeasureSchedule(0)
    # Never calibrated (no split step among unsplit ones): its memory stays bounded.
    idle = MeasureSchedule("auto", base_batch=16)
    for i in range(500):
        idle.observe(16 + 8 * (i % 3), 1e-3, split_to_measure=False)
    assert idle.split_cost is None
    assert {b: len(t) for b, t in idle.state_dict()["plain_times"].items()} == {16: 64, 24: 64, 32: 64}


# -- the noise scale in Adam's geometry (gns_geometry="adam") --------------------------------------

def _adam_weights_by_hand(model: nn.Module, opt: torch.optim.AdamW) -> list[torch.Tensor]:
    """``1 / (sqrt(exp_avg_sq / (1 - beta2^t)) + eps)`` per parameter, from the optimizer's state."""
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    out = []
    for p in model.parameters():
        s = opt.state[p]
        out.append(1 / ((s["exp_avg_sq"] / (1 - beta2 ** float(s["step"]))).sqrt() + eps))
    return out


def test_adam_geometry_norms_are_the_preconditioned_gradients_by_brute_force(noise_data) -> None:
    import functools

    from autobatch.noise.preconditioned import adam_preconditioner

    model, x, y = _problem(noise_data, n=12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    meter = StepNormMeter(model, "micro", every=1, preconditioner=functools.partial(adam_preconditioner, opt))
    # before the optimizer's first step there is no geometry: no norms, the loss still read
    sizes, loss, norms = _run_step(meter, model, x, y, step=1, cap=4)
    assert norms is None and math.isfinite(loss)
    opt.step()
    for _ in range(2):  # state with a few steps in it
        model.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    weights = _adam_weights_by_hand(model, opt)
    flat_w = torch.cat([w.reshape(-1) for w in weights])
    sizes, _, norms = _run_step(meter, model, x, y, step=2, cap=4)
    assert sizes == [4, 4, 4]
    small = [float(((_grad(model, xi, yi) * flat_w) ** 2).sum()) for xi, yi in zip(x.split(4), y.split(4))]
    big = float(((_grad(model, x, y) * flat_w) ** 2).sum())
    raw_big = float((_grad(model, x, y) ** 2).sum())
    assert norms.small_sq_norms[0] == pytest.approx(sum(small) / 3, rel=1e-5)
    assert norms.big_sq_norm == pytest.approx(big, rel=1e-5)
    assert abs(big / raw_big - 1) > 0.5  # the geometry changes the norm: the test can tell them apart


def test_a_preconditioned_meter_is_refused_where_it_cannot_measure(noise_data) -> None:
    model, _, _ = _problem(noise_data)
    with pytest.raises(ValueError, match="method='micro' on one process only"):
        StepNormMeter(model, "per_example", preconditioner=dict)
    with pytest.raises(ValueError, match="data_parallel=True"):
        StepNormMeter(model, "micro", data_parallel=True, preconditioner=dict)
