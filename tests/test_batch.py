"""autobatch.batch: the one batch protocol (how each batch form becomes a loss) and its errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch.batch import check_scalar_loss, forward_and_loss
from autobatch.testing import TwoInputNet


class _Out:
    def __init__(self, loss: torch.Tensor, logits: torch.Tensor) -> None:
        self.loss, self.logits = loss, logits


class _DictModel(nn.Module):
    """Returns an HF-style output with .loss when given labels (or a plain dict)."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.as_dict = as_dict

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.lin(features)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits} if self.as_dict else _Out(loss, logits)


def test_every_row_of_the_protocol_table() -> None:
    torch.manual_seed(0)
    x, x2, y = torch.randn(6, 12), torch.randn(6, 5), torch.randint(3, (6,))
    two = TwoInputNet()
    loss, out = forward_and_loss(two, (x, x2, y), F.cross_entropy)
    assert torch.equal(loss, F.cross_entropy(two(x, x2), y)) and torch.equal(out, two(x, x2))

    lin = nn.Linear(12, 3)
    loss, _ = forward_and_loss(lin, [x, y], F.cross_entropy)
    assert torch.equal(loss, F.cross_entropy(lin(x), y))

    feats = torch.randn(6, 4)
    for model in (_DictModel(), _DictModel(as_dict=True)):
        batch = {"features": feats, "labels": y}
        loss, _ = forward_and_loss(model, batch)  # the output's own .loss / ["loss"]
        assert torch.equal(loss, F.cross_entropy(model.lin(feats), y))
        loss, _ = forward_and_loss(model, batch, lambda out, b: 2 * F.cross_entropy(
            out["logits"] if isinstance(out, dict) else out.logits, b["labels"]))
        assert torch.equal(loss, 2 * F.cross_entropy(model.lin(feats), y))

    loss, out = forward_and_loss(lin, "any object", forward_loss=lambda m, b: m.weight.sum() * len(b))
    assert torch.equal(loss, lin.weight.sum() * 10) and out is None


def test_protocol_errors_name_the_shape_and_the_fix() -> None:
    lin = nn.Linear(4, 3)
    x, y = torch.randn(2, 4), torch.randint(3, (2,))
    per_example = functools.partial(F.cross_entropy, reduction="none")
    with pytest.raises(
        ValueError, match=r"^loss_fn must return a scalar tensor \(got a tensor of shape \(2,\)\); reduce it with .mean\(\)"
    ):
        forward_and_loss(lin, (x, y), per_example)
    with pytest.raises(ValueError, match=r"^forward_loss must return a scalar tensor \(got a float\)"):
        forward_and_loss(lin, (x, y), forward_loss=lambda m, b: 1.0)
    with pytest.raises(ValueError, match=r"scalar tensor \(got a torch.int64 tensor\)"):
        check_scalar_loss(torch.tensor(3))
    with pytest.raises(TypeError, match=r"a tuple batch \(inputs..., target\) needs loss_fn"):
        forward_and_loss(lin, (x, y))
    with pytest.raises(ValueError, match=r"returned a _Out without one; put the targets in the batch .* 'labels'"):
        forward_and_loss(_DictModel(), {"features": x})
    with pytest.raises(TypeError, match=r"cannot read a tuple of length 1 batch.*forward_loss"):
        forward_and_loss(lin, (x,), F.cross_entropy)
    with pytest.raises(TypeError, match=r"cannot read a Tensor batch"):
        forward_and_loss(lin, x, F.cross_entropy)
