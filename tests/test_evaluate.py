"""autobatch.evaluate: validation loss and accuracy against the same metrics computed in one pass."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch.data import as_batch_source
from autobatch.evaluate import evaluate
from autobatch.testing import USER_MODELS, token_loss


def test_evaluate_scores_class_and_token_logits_ignoring_minus_100() -> None:
    lin = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(3, (10,))
    y[3] = -100
    ce = functools.partial(F.cross_entropy, ignore_index=-100)
    metrics = evaluate(lin, (x, y), ce, batch_size=4, loss_items="tokens")
    keep = y != -100
    with torch.no_grad():
        assert metrics["val_accuracy"] == pytest.approx(float((lin(x).argmax(1) == y)[keep].float().mean()))
        assert metrics["val_loss"] == pytest.approx(float(ce(lin(x), y)), rel=1e-6)
    assert "val_accuracy" not in evaluate(lin, (x, torch.randn(10, 3)), F.mse_loss)  # regression

    case = USER_MODELS["padded_lm"]()
    metrics = evaluate(case.model, case.data, case.loss_fn, batch_size=5, loss_items="tokens")
    x, y = as_batch_source(case.data).batch(range(len(case.data.dataset)))
    with torch.no_grad():
        logits = case.model(x)
        keep = y != -100
        assert metrics["val_accuracy"] == pytest.approx(float((logits.argmax(-1) == y)[keep].float().mean()))
        assert metrics["val_loss"] == pytest.approx(float(token_loss(logits, y)), rel=1e-5)

    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x), x.sum()

    x, y = torch.randn(10, 4), torch.randint(3, (10,))
    tuple_metrics = evaluate(TupleOut(), (x, y), lambda out, t: F.cross_entropy(out[0], t))
    assert tuple_metrics == evaluate(lin, (x, y), F.cross_entropy)


def test_evaluate_a_hugging_face_causal_lm_scores_the_next_token() -> None:
    case = USER_MODELS["gpt2"]()
    metrics = evaluate(case.model, case.data, batch_size=7)
    batch = as_batch_source(case.data).batch(range(len(case.data.dataset)))
    with torch.no_grad():
        out = case.model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    assert metrics["val_loss"] == pytest.approx(float(out.loss), rel=1e-5)  # token mean, whatever the batching
    assert metrics["val_accuracy"] == pytest.approx(float((logits.argmax(-1) == labels)[keep].float().mean()))


class _NextTokenLM(nn.Module):
    """Predicts every next token of the cyclic sequences of ``_cyclic``: the logits at a token
    ``t`` are 10 x one-hot of ``(t + 1) % vocab``."""

    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(10 * torch.eye(vocab).roll(1, dims=1))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.emb(input_ids)


def _cyclic(n: int = 20, vocab: int = 8, length: int = 6) -> torch.Tensor:
    return (torch.randint(vocab, (n, 1)) + torch.arange(length)) % vocab


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A user's own LM loss on ``(x, x)`` batches: position t predicts token t + 1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_targets_that_are_the_inputs_get_no_accuracy_unless_the_alignment_is_given() -> None:
    model, x = _NextTokenLM(), _cyclic()
    with pytest.warns(UserWarning, match=r"accuracy='next_token'"):
        metrics = evaluate(model, (x, x), _next_token_loss)
    assert "val_accuracy" not in metrics  # not 0.0: the model predicts every next token
    assert evaluate(model, (x, x), _next_token_loss, accuracy="next_token")["val_accuracy"] == 1.0
    assert evaluate(model, (x, x), _next_token_loss, accuracy="same_position")["val_accuracy"] == 0.0
    assert "val_accuracy" not in evaluate(model, (x, x), _next_token_loss, accuracy=False)
    # a dict batch whose labels are its input_ids, padded with -100, and the user's own loss
    labels = x.clone()
    labels[:, -2:] = -100
    batch = {"input_ids": x, "labels": labels}
    loss = lambda out, b: _next_token_loss(out, b["input_ids"])  # noqa: E731
    with pytest.warns(UserWarning, match=r"accuracy='next_token'"):
        assert "val_accuracy" not in evaluate(model, batch, loss)
    assert evaluate(model, batch, loss, accuracy="next_token")["val_accuracy"] == 1.0
    # targets that are another tensor (the inputs shifted by the user) are compared in place
    assert evaluate(model, (x[:, :-1], x[:, 1:]), token_loss)["val_accuracy"] == 1.0


def test_an_alignment_the_outputs_cannot_have_is_refused_with_the_fix() -> None:
    lin = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(3, (10,))
    with pytest.raises(ValueError, match=r"accuracy='next_token' needs token logits \(B, T, V\).*got logits of "
                                         r"shape \(10, 3\).*pass accuracy='same_position'"):
        evaluate(lin, (x, y), F.cross_entropy, accuracy="next_token")
    with pytest.raises(ValueError, match=r"accuracy='same_position' needs integer targets.*float32.*accuracy=False"):
        evaluate(lin, (x, torch.randn(10, 3)), F.mse_loss, accuracy="same_position")
    with pytest.raises(ValueError, match=r"accuracy must be 'auto', 'next_token', 'same_position' or False "
                                         r"\(got accuracy='next'\)"):
        evaluate(lin, (x, y), F.cross_entropy, accuracy="next")


class _OutOfMemoryAbove(nn.Module):
    """A classifier whose forward runs out of memory on more than ``limit`` examples, as a
    full device would."""

    def __init__(self, lin: nn.Module, limit: int) -> None:
        super().__init__()
        self.lin, self.limit, self.sizes = lin, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {self.limit} examples)")
        return self.lin(x)


def test_an_out_of_memory_batch_is_halved_and_the_metrics_do_not_change() -> None:
    lin = nn.Linear(4, 3)
    x, y = torch.randn(100, 4), torch.randint(3, (100,))
    model = _OutOfMemoryAbove(lin, limit=8)
    metrics = evaluate(model, (x, y), F.cross_entropy, batch_size=64)
    assert model.sizes[:4] == [64, 32, 16, 8] and max(model.sizes[4:]) == 8  # halved once, kept
    whole = evaluate(lin, (x, y), F.cross_entropy, batch_size=100)
    assert metrics["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    assert metrics["val_accuracy"] == whole["val_accuracy"]
    with pytest.raises(RuntimeError, match=r"evaluation ran out of memory on a single example"):
        evaluate(_OutOfMemoryAbove(lin, limit=0), (x, y), F.cross_entropy, batch_size=4)
