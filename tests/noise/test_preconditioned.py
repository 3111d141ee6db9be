from __future__ import annotations

import functools

import pytest
import torch

from autobatch.noise import GradientNoiseScale
from autobatch.noise.preconditioned import PreconditionedNormCollector, adam_preconditioner
from autobatch.testing import mlp, per_example_grads


def _weights(model: torch.nn.Module, seed: int = 0) -> dict[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # a fixed, strongly uneven diagonal preconditioner (weights 0.05 .. 20)
    return {p: torch.exp(torch.empty(p.shape).uniform_(-3, 3, generator=gen)) for p in model.parameters()}


def test_weighted_norms_equal_brute_force_micro_batch_gradients() -> None:
    prob = mlp(n=64, seed=1)
    w = _weights(prob.model)
    flat_w = torch.cat([w[p].reshape(-1) for p in prob.model.parameters()]).double()
    g = per_example_grads(prob.model, prob.x, prob.y, prob.loss_fn).double()  # (64, P)
    collector = PreconditionedNormCollector(prob.model, lambda: w)
    prob.model.zero_grad(set_to_none=True)
    collector.begin_step()
    for i in range(4):  # 4 micro-batches of 16, loss weight 16/64
        sl = slice(16 * i, 16 * (i + 1))
        (prob.loss_fn(prob.model(prob.x[sl]), prob.y[sl]) * 0.25).backward()
        collector.after_backward(16, 0.25)
    norms = collector.end_step()
    assert norms is not None
    expected_small = [float(((g[16 * i : 16 * (i + 1)].mean(0)) * flat_w).square().sum()) for i in range(4)]
    assert norms.small_sq_norms == pytest.approx(expected_small, rel=1e-4)
    assert norms.big_sq_norm == pytest.approx(float((g.mean(0) * flat_w).square().sum()), rel=1e-4)
    collector.remove()


@pytest.mark.slow
def test_preconditioned_noise_scale_matches_the_exact_one() -> None:
    prob = mlp(n=2048, seed=2, steps=30)
    # one weight per tensor, far apart: the first layer dominates the preconditioned norms
    w = {p: torch.full(p.shape, s) for p, s in zip(prob.model.parameters(), (10.0, 1.0, 0.1, 0.1))}
    flat_w = torch.cat([w[p].reshape(-1) for p in prob.model.parameters()]).double()
    pg = per_example_grads(prob.model, prob.x, prob.y, prob.loss_fn).double() * flat_w  # P g_i
    mean = pg.mean(0)
    exact = float((pg - mean).square().sum(1).mean()) / float(mean.square().sum())
    raw = per_example_grads(prob.model, prob.x, prob.y, prob.loss_fn).double()
    raw_exact = float((raw - raw.mean(0)).square().sum(1).mean()) / float(raw.mean(0).square().sum())
    assert abs(exact / raw_exact - 1) > 0.2  # the geometry matters here, so the test can fail

    gns = GradientNoiseScale(smoothing=0.995)
    gen = torch.Generator().manual_seed(0)
    with PreconditionedNormCollector(prob.model, lambda: w) as collector:
        for _ in range(400):
            idx = torch.randint(0, 2048, (64,), generator=gen)  # with replacement: i.i.d. draws
            prob.model.zero_grad(set_to_none=True)
            collector.begin_step()
            for part in idx.chunk(8):
                (prob.loss_fn(prob.model(prob.x[part]), prob.y[part]) * (len(part) / 64)).backward()
                collector.after_backward(len(part), len(part) / 64)
            n = collector.end_step()
            gns.update(n.small_sq_norms, n.small_batch_size, n.big_sq_norm, n.big_batch_size)
    assert gns.noise_scale == pytest.approx(exact, rel=0.1)


def test_adam_preconditioner_is_one_over_sqrt_v_hat_plus_eps() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    assert adam_preconditioner(opt) == {}  # no state before the first step
    v = {p: torch.zeros_like(p) for p in model.parameters()}
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().mean().backward()
        for p in model.parameters():
            v[p] = 0.99 * v[p] + 0.01 * p.grad.square()
        opt.step()
    weights = adam_preconditioner(opt)
    for p in model.parameters():
        assert torch.allclose(weights[p], 1 / ((v[p] / (1 - 0.99**3)).sqrt() + 1e-6), rtol=1e-5)
    # the collector reads them at each step's start
    collector = PreconditionedNormCollector(model, functools.partial(adam_preconditioner, opt))
    collector.begin_step()
    assert set(collector._weights_now) == set(model.parameters())
    collector.remove()
