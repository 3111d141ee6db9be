"""autobatch.accumulate: micro-batches weighted by their loss items add up to the big batch's
mean-loss gradient, streamed or across data-parallel ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobatch.accumulate import accumulate_gradients, count_loss_items
from autobatch.batch import forward_and_loss
from autobatch.data import as_batch_source
from autobatch.testing import USER_MODELS, token_loss


@pytest.mark.parametrize("name", ["gpt2", "bert_mlm", "padded_lm"])
def test_accumulated_micro_batches_equal_the_big_batch_token_mean(name: str, flat_grad) -> None:
    case = USER_MODELS[name]()
    model, source = case.model, as_batch_source(case.data)
    # Length-sorted indices: micro-batches of very different token counts (the worst case).
    lengths = torch.tensor([len(next(iter(source.dataset[i].values())) if isinstance(source.dataset[i], dict)
                                else source.dataset[i][0]) for i in range(32)])
    indices = torch.argsort(lengths)
    model.zero_grad()
    loss, _ = forward_and_loss(model, source.batch(indices), case.loss_fn)  # padded to the longest
    loss.backward()
    reference = flat_grad(model)
    for sizes in ([8, 8, 8, 8], [3, 5, 7, 17], [1] * 4 + [28]):
        model.zero_grad()
        done = accumulate_gradients(model, [source.batch(c) for c in indices.split(sizes)],
                                    loss_fn=case.loss_fn, loss_items=case.loss_items)
        error = float((flat_grad(model) - reference).norm() / reference.norm())
        assert error < 1e-5, (sizes, error)
        assert float(done.loss) == pytest.approx(loss.item(), rel=1e-5)  # the step's token mean
    # The test can fail: weighting by examples (the old rule) is off by far more.
    model.zero_grad()
    accumulate_gradients(model, [source.batch(c) for c in indices.split([3, 5, 7, 17])],
                         loss_fn=case.loss_fn, loss_items="examples")
    assert float((flat_grad(model) - reference).norm() / reference.norm()) > 1e-3


def test_loss_items_count_what_the_loss_averages_over() -> None:
    gpt2 = USER_MODELS["gpt2"]()
    batch = as_batch_source(gpt2.data).batch([0, 1, 2])
    real = batch["attention_mask"].sum(1)
    # GPT-2 shifts its labels: a sequence of n tokens has n - 1 loss tokens.
    assert int(count_loss_items(batch, model=gpt2.model)) == int((real - 1).sum())
    # With a loss_fn of the user's own, "auto" means examples, and "tokens" does not shift.
    assert count_loss_items(batch, model=gpt2.model, loss_fn=token_loss) == 3
    assert int(count_loss_items(batch, "tokens", model=gpt2.model, loss_fn=token_loss)) == int(real.sum())
    assert count_loss_items(batch, lambda b: 11) == 11
    with pytest.raises(ValueError, match=r"loss_items must be one of \('auto', 'examples', 'tokens'\)"):
        count_loss_items(batch, "words")
    with pytest.raises(ValueError, match="needs integer targets"):
        count_loss_items((torch.zeros(2, 3), torch.zeros(2)), "tokens")
    with pytest.raises(ValueError, match="no 'labels' tensor"):
        count_loss_items({"input_ids": torch.zeros(2, 3)}, "tokens")


def test_a_micro_batch_without_loss_items_is_skipped_not_nan(flat_grad) -> None:
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))
    x = torch.randint(8, (4, 5))
    y = x.clone()
    y[:2] = -100  # the first micro-batch has nothing to learn from
    model.zero_grad()
    token_loss(model(x[2:]), y[2:]).backward()
    reference = flat_grad(model)
    model.zero_grad()
    done = accumulate_gradients(model, [(x[:2], y[:2]), (x[2:], y[2:])], loss_fn=token_loss,
                                loss_items="tokens")
    assert done.items == [0, 10] and torch.allclose(flat_grad(model), reference)



def test_streaming_and_data_parallel_denominators(flat_grad) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(12, 4), torch.randint(3, (12,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    reference = flat_grad(model)
    pulled = []

    def lazily():  # examples mode with the step size known: collated one at a time
        for chunk in torch.arange(12).split(5):
            pulled.append(len(chunk))
            yield x[chunk], y[chunk]

    model.zero_grad()
    done = accumulate_gradients(model, lazily(), loss_fn=F.cross_entropy, step_examples=12,
                                after_backward=lambda m: pulled.append(("backward", m.index)))
    assert pulled == [5, ("backward", 0), 5, ("backward", 1), 2, ("backward", 2)]
    assert torch.allclose(flat_grad(model), reference) and done.total_items == 12
    # Two ranks holding the same data: each rank's share weighs half of the global mean.
    model.zero_grad()
    tokens = accumulate_gradients(model, [(x[:6], y[:6]), (x[6:], y[6:])], loss_fn=F.cross_entropy,
                                  loss_items="tokens", all_reduce_items=lambda n: 2 * n)
    assert tokens.total_items == 24 and torch.allclose(flat_grad(model), reference / 2)
