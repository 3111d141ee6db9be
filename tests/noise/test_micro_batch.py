"""MicroBatchNormCollector against micro-batch gradients computed separately with autograd.grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch.noise import MicroBatchNormCollector, two_batch_estimates
from autobatch.noise._effective_batch import harmonic_batch_size


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _sq_norm(grads: list[torch.Tensor | None]) -> float:
    return sum(float(g.double().square().sum()) for g in grads if g is not None)


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sizes: list[int]):
    """Each micro-batch's mean-loss gradient and the whole batch's, by separate autograd
    calls (no hooks, no accumulation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    smalls = []
    for xs, ys in zip(torch.split(x, sizes), torch.split(y, sizes)):
        smalls.append(_sq_norm(torch.autograd.grad(F.cross_entropy(model(xs), ys), params, allow_unused=True)))
    big = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)
    return smalls, _sq_norm(list(big)), big


def _run_step(model, x, y, sizes, *, reduction="mean", weights=None, grad_scale=1.0):
    total = sum(sizes)
    with MicroBatchNormCollector(model, loss_reduction=reduction) as collector:
        model.zero_grad(set_to_none=True)
        collector.begin_step()
        for i, (xs, ys) in enumerate(zip(torch.split(x, sizes), torch.split(y, sizes))):
            loss = F.cross_entropy(model(xs), ys, reduction=reduction)
            weight = weights[i] if weights is not None else len(xs) / total
            (loss * weight * grad_scale).backward()
            collector.after_backward(batch_size=len(xs), loss_weight=weight)
        return collector.end_step(grad_scale=grad_scale)


def test_unequal_micro_batches_match_separate_gradients(classification) -> None:
    model = _model()
    x, y = classification(16, 6)
    sizes = [3, 5, 8]
    ref_small, ref_big, ref_grads = _reference(model, x, y, sizes)
    norms = _run_step(model, x, y, sizes)
    assert norms is not None
    assert norms.small_sq_norms == pytest.approx(ref_small, rel=1e-5)
    assert norms.big_sq_norm == pytest.approx(ref_big, rel=1e-5)
    assert norms.big_batch_size == 16
    assert norms.micro_batch_sizes == sizes
    assert norms.small_batch_size == pytest.approx(3 / (1 / 3 + 1 / 5 + 1 / 8))
    # The hooks only read: .grad is still the whole batch's mean-loss gradient.
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_sum_reduction_amp_scale_and_unit_weights_give_mean_loss_norms(classification) -> None:
    model = _model()
    x, y = classification(16, 6)
    sizes = [4, 4, 4, 4]
    ref_small, ref_big, _ = _reference(model, x, y, sizes)
    # Sum-reduced losses, each weighted 1 (so .grad is the gradient of the total sum).
    summed = _run_step(model, x, y, sizes, reduction="sum", weights=[1.0] * 4)
    # Mean-reduced losses, each weighted 1 (so .grad is 4x the mean gradient), AMP-like scale.
    scaled = _run_step(model, x, y, sizes, weights=[1.0] * 4, grad_scale=1024.0)
    for norms in (summed, scaled):
        assert norms.small_sq_norms == pytest.approx(ref_small, rel=1e-5)
        assert norms.big_sq_norm == pytest.approx(ref_big, rel=1e-5)


def test_frozen_and_unused_parameters_are_left_out(classification) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(6, 16).requires_grad_(False)
            self.head = nn.Linear(16, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.frozen(x)))

    model = Net()
    x, y = classification(16, 6)
    ref_small, ref_big, _ = _reference(model, x, y, [8, 8])
    norms = _run_step(model, x, y, [8, 8])
    assert norms.small_sq_norms == pytest.approx(ref_small, rel=1e-5)
    assert norms.big_sq_norm == pytest.approx(ref_big, rel=1e-5)
    assert model.unused.weight.grad is None


def test_one_micro_batch_gives_none_and_removed_hooks_record_nothing(classification) -> None:
    model = _model()
    x, y = classification(16, 6)
    assert _run_step(model, x, y, [16]) is None
    collector = MicroBatchNormCollector(model)
    collector.remove()
    collector.begin_step()
    F.cross_entropy(model(x), y).backward()
    collector.after_backward(batch_size=16)
    assert collector._micro_sq[0].item() == 0.0  # no hook fired after remove()


def test_micro_norms_feed_an_unbiased_estimate() -> None:
    # Per-example gradients of a linear least-squares model at w = 0 are -y_i x_i; with
    # x ~ N(0, I) and y = x.u + noise their mean and covariance are known in closed form.
    torch.manual_seed(1)
    d, b, k, steps = 8, 4, 4, 1500
    u = torch.randn(d)
    model = nn.Linear(d, 1, bias=False)
    nn.init.zeros_(model.weight)
    small_mean, big_mean = 0.0, 0.0
    collector = MicroBatchNormCollector(model)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        collector.begin_step()
        for _ in range(k):
            x = torch.randn(b, d)
            y = x @ u + torch.randn(b)
            (0.5 * (model(x).squeeze(1) - y).square().mean() / k).backward()
            collector.after_backward(batch_size=b, loss_weight=1 / k)
        norms = collector.end_step()
        small_mean += sum(norms.small_sq_norms) / k / steps
        big_mean += norms.big_sq_norm / steps
    # g_i = -y_i x_i: G = E[y x] = u; E|g|^2 = E[y^2 |x|^2] = (d + 2)|u|^2 + d.
    grad_sq = float(u @ u)
    trace_cov = (d + 2) * grad_sq + d - grad_sq
    est_g, est_s = two_batch_estimates(small_mean, b, big_mean, b * k)
    assert est_s == pytest.approx(trace_cov, rel=0.05)
    assert est_g == pytest.approx(grad_sq, rel=0.1)


def test_harmonic_batch_size_makes_unequal_sizes_exact() -> None:
    grad_sq, trace_cov, sizes = 2.0, 50.0, [2, 6, 8]
    mean_small = sum(grad_sq + trace_cov / b for b in sizes) / len(sizes)
    big = sum(sizes)
    g, s = two_batch_estimates(mean_small, harmonic_batch_size(sizes), grad_sq + trace_cov / big, big)
    assert (g, s) == (pytest.approx(grad_sq), pytest.approx(trace_cov))


def test_errors_name_the_value_and_the_fix(classification) -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        MicroBatchNormCollector(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ValueError, match=r"loss_reduction must be one of .* loss_reduction='max'"):
        MicroBatchNormCollector(_model(), loss_reduction="max")  # type: ignore[arg-type]
    model = _model()
    x, y = classification(16, 6)
    with pytest.raises(ValueError, match=r"proportional .* weights \[0.5, 0.5\] for sizes \[4, 12\]"):
        _run_step(model, x, y, [4, 12], weights=[0.5, 0.5])
    collector = MicroBatchNormCollector(model)
    with pytest.raises(RuntimeError, match="call begin_step"):
        collector.after_backward(batch_size=4)
    collector.begin_step()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="arrived after the last after_backward"):
        collector.end_step()
    collector.begin_step()
    with pytest.raises(ValueError, match=r"batch_size must be >= 1 .*batch_size=0"):
        collector.after_backward(batch_size=0)
