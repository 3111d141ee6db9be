"""PerExampleGradNorms against one backward per example (a plain loop, no hooks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch.testing import PROBLEMS, per_example_sq_norms_loop
from autobatch.noise import PerExampleGradNorms


def _measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, **kwargs) -> torch.Tensor:
    with PerExampleGradNorms(model) as per_example:
        loss_fn(model(x), y).backward()
        return per_example.sq_norms(**kwargs).double()


def _assert_matches_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, rel: float = 1e-5) -> None:
    expected = per_example_sq_norms_loop(model, x, y, loss_fn)
    got = _measure(model, x, y, loss_fn)
    assert got.shape == expected.shape
    assert torch.all(expected > 0)
    assert float(((got - expected).abs() / expected).max()) <= rel


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_problems_match_brute_force(name: str, dtype: torch.dtype) -> None:
    problem = PROBLEMS[name](n=12)
    model = problem.model.to(dtype)
    x = problem.x.to(dtype) if problem.x.is_floating_point() else problem.x
    y = problem.y.to(dtype) if problem.y.is_floating_point() else problem.y
    _assert_matches_loop(model, x, y, problem.loss_fn)


class _Scale(nn.Module):
    """A module with a parameter of its own and no closed form: torch.func handles it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class _Shared(nn.Module):
    """The same Linear applied twice (its calls add up per example), a frozen layer, an
    unused layer and a multi-output torch.func module (MultiheadAttention)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.unused = nn.Linear(6, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(torch.tanh(self.inner(self.frozen(x)))))
        h, _ = self.attn(h, h, h)
        return self.out(h).mean(dim=1)


LAYER_CASES = {
    # 3-D Linear, few positions and wide features: the Gram form.
    "linear_gram": (lambda: nn.Sequential(nn.Linear(32, 32), nn.Flatten(), nn.Linear(64, 3)), (2, 32)),
    # 3-D Linear, many positions and narrow features: per-example weight gradients by bmm.
    "linear_bmm": (lambda: nn.Sequential(nn.Linear(3, 2), nn.Flatten(), nn.Linear(80, 3)), (40, 3)),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2, padding_mode="reflect"),
            nn.Flatten(),
            nn.Linear(6 * 8, 3),
        ),
        (4, 16),
    ),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 2, stride=2, bias=False),
            nn.Flatten(), nn.Linear(16, 3),
        ),
        (2, 4, 4),
    ),
    "layer_norm_2d_shape": (lambda: nn.Sequential(nn.LayerNorm([3, 4]), nn.Flatten(), nn.Linear(12, 3)), (3, 4)),
    "func_fallback": (
        lambda: nn.Sequential(_Scale(5), nn.GroupNorm(1, 5), nn.Flatten(), nn.Linear(10, 3)),
        (5, 2),
    ),
    "shared_frozen_unused_mha": (_Shared, (4, 6)),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layers_match_brute_force(case: str) -> None:
    build, shape = LAYER_CASES[case]
    model = build()
    x, y = torch.randn(6, *shape), torch.randint(3, (6,))
    _assert_matches_loop(model, x, y, F.cross_entropy)


def test_embedding_with_repeated_tokens_and_padding_idx() -> None:
    model = nn.Sequential(nn.Embedding(5, 4, padding_idx=0), nn.Flatten(), nn.Linear(24, 3))
    x = torch.tensor([[1, 1, 1, 2, 0, 0], [0, 3, 4, 3, 1, 2], [4, 4, 4, 4, 4, 4]])
    _assert_matches_loop(model, x, torch.tensor([0, 1, 2]), F.cross_entropy)


def test_scaling_conventions() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(8, 4), torch.randint(2, (8,))
    expected = per_example_sq_norms_loop(model, x, y, F.cross_entropy)
    with PerExampleGradNorms(model, loss_reduction="sum") as per_example:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        torch.testing.assert_close(per_example.sq_norms().double(), expected, rtol=1e-5, atol=0)
    with PerExampleGradNorms(model) as per_example:
        (F.cross_entropy(model(x), y) * 0.25 * 512.0).backward()  # micro-batch weight, AMP scale
        got = per_example.sq_norms(loss_weight=0.25, grad_scale=512.0).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_layers_that_mix_examples_or_hide_parameters_raise() -> None:
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(8, 4), torch.randint(2, (8,))
    with PerExampleGradNorms(bn), pytest.raises(ValueError, match=r"layer '1' \(BatchNorm1d\) mixes the examples"):
        bn(x)
    bn.eval()  # running statistics: examples are independent again
    _assert_matches_loop(bn, x, y, F.cross_entropy)

    tied = nn.Sequential(nn.Embedding(5, 5), nn.Linear(5, 5))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared by layers '0' and '1'"):
        PerExampleGradNorms(tied)
    with pytest.raises(ValueError, match=r"layer '0' \(Embedding\) has scale_grad_by_freq"):
        PerExampleGradNorms(nn.Sequential(nn.Embedding(5, 4, scale_grad_by_freq=True)))
    with pytest.raises(ValueError, match="no trainable parameters"):
        PerExampleGradNorms(nn.Linear(2, 2).requires_grad_(False))

    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + F.linear(x, self.b.weight)

    sneaky = Sneaky()
    with PerExampleGradNorms(sneaky) as per_example:
        F.cross_entropy(sneaky(x), y).backward()
        with pytest.raises(RuntimeError, match=r"layer 'b' \(Linear\) got a gradient .* never ran"):
            per_example.sq_norms()

    seq_first = nn.MultiheadAttention(4, 1)  # batch_first=False: dimension 0 is the sequence
    with PerExampleGradNorms(seq_first), pytest.raises(ValueError, match="dimension 0 is not the batch"):
        seq_first(torch.randn(3, 8, 4), torch.randn(3, 8, 4), torch.randn(3, 8, 4))


def test_one_forward_per_measurement() -> None:
    model = nn.Linear(3, 2)
    with PerExampleGradNorms(model) as per_example:
        with pytest.raises(RuntimeError, match="needs a forward and a backward"):
            per_example.sq_norms()
        model(torch.randn(4, 3)).sum().backward()
        with pytest.raises(RuntimeError, match="second forward before sq_norms"):
            model(torch.randn(4, 3))
