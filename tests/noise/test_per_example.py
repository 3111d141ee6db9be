"""PerExampleNormCollector against one backward per example (a plain loop, no hooks)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch.noise import PerExampleNormCollector
from autobatch.noise.per_example import UnsupportedForPerExample, per_example_supported
from autobatch.testing import (
    EXACT_CASES,
    per_example_sq_norms_loop,
    per_example_sq_norms_same_forward,
)


def _measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, **kwargs) -> torch.Tensor:
    with PerExampleNormCollector(model) as per_example:
        loss_fn(model(x), y).backward()
        return per_example.sq_norms(**kwargs).double()


def _assert_matches_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, rel: float = 1e-5) -> None:
    expected = per_example_sq_norms_loop(model, x, y, loss_fn)
    got = _measure(model, x, y, loss_fn)
    assert got.shape == expected.shape
    assert torch.all(expected > 0)
    assert float(((got - expected).abs() / expected).max()) <= rel


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_problems_match_brute_force(name: str, dtype: torch.dtype) -> None:
    problem = EXACT_CASES[name](n=12)
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
    with PerExampleNormCollector(model, loss_reduction="sum") as per_example:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        torch.testing.assert_close(per_example.sq_norms().double(), expected, rtol=1e-5, atol=0)
    with PerExampleNormCollector(model) as per_example:
        (F.cross_entropy(model(x), y) * 0.25 * 512.0).backward()  # micro-batch weight, AMP scale
        got = per_example.sq_norms(loss_weight=0.25, grad_scale=512.0).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_layers_that_mix_examples_or_hide_parameters_raise() -> None:
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(8, 4), torch.randint(2, (8,))
    mixes = r"layer '1' \(BatchNorm1d\) mixes the examples.*gns_method='micro' in fit"
    assert re.search(mixes, per_example_supported(bn))
    with pytest.raises(UnsupportedForPerExample, match=mixes):  # before any work
        PerExampleNormCollector(bn)
    bn.eval()  # running statistics: examples are independent again
    assert per_example_supported(bn, train=None) is None and per_example_supported(bn) is not None
    _assert_matches_loop(bn, x, y, F.cross_entropy)
    with PerExampleNormCollector(bn), pytest.raises(UnsupportedForPerExample, match=mixes):
        bn.train()(x)  # put back in train mode after the collector was made

    tied = nn.Sequential(nn.Embedding(5, 5), nn.Linear(5, 5))
    tied[1].weight = tied[0].weight
    with pytest.raises(UnsupportedForPerExample, match="shared by layers '0' and '1'"):
        PerExampleNormCollector(tied)
    with pytest.raises(UnsupportedForPerExample, match=r"layer '0' \(Embedding\) has scale_grad_by_freq"):
        PerExampleNormCollector(nn.Sequential(nn.Embedding(5, 4, scale_grad_by_freq=True)))
    with pytest.raises(ValueError, match="no trainable parameters"):
        PerExampleNormCollector(nn.Linear(2, 2).requires_grad_(False))
    assert "no trainable parameters" in per_example_supported(nn.Linear(2, 2).requires_grad_(False))

    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + F.linear(x, self.b.weight)

    sneaky = Sneaky()
    with PerExampleNormCollector(sneaky) as per_example:
        F.cross_entropy(sneaky(x), y).backward()
        with pytest.raises(UnsupportedForPerExample, match=r"layer 'b' \(Linear\) got a gradient .* never ran"):
            per_example.sq_norms()

    seq_first = nn.MultiheadAttention(4, 1)  # batch_first=False: dimension 0 is the sequence
    with PerExampleNormCollector(seq_first), pytest.raises(UnsupportedForPerExample, match="dimension 0 is not the batch"):
        seq_first(torch.randn(3, 8, 4), torch.randn(3, 8, 4), torch.randn(3, 8, 4))


def test_one_forward_per_measurement() -> None:
    model = nn.Linear(3, 2)
    with PerExampleNormCollector(model) as per_example:
        with pytest.raises(RuntimeError, match="needs a forward and a backward"):
            per_example.sq_norms()
        model(torch.randn(4, 3)).sum().backward()
        with pytest.raises(RuntimeError, match="second forward before sq_norms"):
            model(torch.randn(4, 3))


# ---------------------------------------------------------------------------- issue 10
class _ViT(nn.Module):
    """Patch embedding, then parameters owned by the root module (cls token, position
    embedding), a transformer block with dropout (MultiheadAttention runs under torch.func)
    and a head on the cls token."""

    def __init__(self, width: int = 8, patches: int = 4, dropout: float = 0.3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, width, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, width) * 0.1)
        self.block = nn.TransformerEncoderLayer(width, 2, 16, dropout=dropout, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)  # (B, patches, width)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
        h = self.block(h + self.pos_embed[:, : h.shape[1]])
        return self.head(h[:, 0])


class _PositionsLM(nn.Module):
    """Position embeddings looked up without the batch: ``pos(arange(T))`` (T, D) or, as
    Hugging Face does, ``pos(arange(T)[None])`` (1, T, D); both broadcast over the batch."""

    def __init__(self, vocab: int = 11, width: int = 6, hf_style: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(16, width)
        self.mix = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)
        self.hf_style = hf_style

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1])
        pos = self.pos(positions[None] if self.hf_style else positions)
        h = self.tok(tokens) + self.ln(pos)  # a layer on the shared positions, too
        return self.out(torch.tanh(self.mix(h)))


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _per_example_token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


@pytest.mark.parametrize("length", [5, 6])  # 6: the sequence length equals the batch
@pytest.mark.parametrize("hf_style", [False, True])
def test_broadcast_position_embeddings_match_brute_force(length: int, hf_style: bool) -> None:
    torch.manual_seed(0)
    model = _PositionsLM(hf_style=hf_style)
    x, y = torch.randint(11, (6, length)), torch.randint(11, (6, length))
    _assert_matches_loop(model, x, y, _token_ce)


def test_root_owned_parameters_and_dropout_in_torch_func_match_brute_force() -> None:
    torch.manual_seed(0)
    model = _ViT().train()
    assert per_example_supported(model) is None
    x, y = torch.randn(5, 1, 4, 4), torch.randint(3, (5,))
    expected = per_example_sq_norms_same_forward(
        model, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"), seed=3)
    with PerExampleNormCollector(model) as per_example:
        torch.manual_seed(3)  # the same dropout masks as the reference's forward
        F.cross_entropy(model(x), y).backward()
        got = per_example.sq_norms().double()
    assert float(((got - expected).abs() / expected).max()) <= 1e-4
    # Only the root's own parameters are followed op by op; the root is not run under vmap.
    layers = {layer.name: layer.kind for layer in PerExampleNormCollector(model)._layers}
    assert "<model>" not in layers and layers["block.self_attn"] == "func"


def test_rnns_give_a_clean_unsupported_error_before_any_work_and_lstm_works() -> None:
    from autobatch.testing import GRUClassifier

    reason = per_example_supported(GRUClassifier())
    assert re.search(r"layer 'gru' \(GRU\) cannot run under torch.func's vmap.*gns_method='micro'", reason)
    with pytest.raises(UnsupportedForPerExample, match=re.escape(reason)):
        PerExampleNormCollector(GRUClassifier())

    class LSTMClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap's "performance drop" for LSTM
        _assert_matches_loop(LSTMClassifier(), torch.randn(4, 5, 3), torch.randint(2, (4,)), F.cross_entropy)
