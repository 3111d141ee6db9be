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


# -- the loss must be a mean: a summed one is refused before any step ------------------------
def _summed_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def _info_nce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # a mean over the batch whose examples interact: about log(B) at initialisation
    z = F.normalize(out, dim=1)
    return F.cross_entropy(z @ z.T / 0.1, torch.arange(len(z)))


def test_a_summed_loss_is_refused_before_any_step(classification) -> None:
    import autobatch

    x, y = classification(n=256, d=8, classes=3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"loss_fn looks summed over the batch.*reduction='mean'"):
        autobatch.fit(model, (x, y), loss_fn=nn.CrossEntropyLoss(reduction="sum"), lr=0.01, epochs=1,
                      progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no step ran
    with pytest.raises(ValueError, match="looks summed"):
        autobatch.measure_noise_scale(model, (x, y), nn.CrossEntropyLoss(reduction="sum"), batch_size=32,
                                      micro_batch_size=8, num_batches=2)
    # the same model with the mean trains, as does a mean whose examples interact
    autobatch.fit(model, (x, y), loss_fn=nn.CrossEntropyLoss(), lr=0.01, max_steps=2, progress=False)
    autobatch.fit(nn.Linear(8, 16), (x, y), loss_fn=_info_nce, lr=0.01, max_steps=2, progress=False)


def test_a_token_sum_is_refused_and_a_padded_token_mean_is_not() -> None:
    import autobatch

    case = USER_MODELS["padded_lm"]()  # variable-length sequences padded with -100
    with pytest.raises(ValueError, match=r"looks summed.*first 2 and last 4"):
        autobatch.fit(case.model, case.data, loss_fn=_summed_token_loss, loss_items="tokens", lr=0.01,
                      max_steps=1, progress=False)
    # the halves hold different token counts: a token mean must be weighted by them to pass
    autobatch.fit(case.model, case.data, loss_fn=case.loss_fn, loss_items="tokens", lr=0.01, max_steps=1,
                  progress=False)


def test_setup_never_collates_one_example(classification) -> None:
    # timm's Mixup collate refuses odd batches ("batch size should be even"); setup once
    # collated a single example to read the batch's form, failing before training
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data._utils.collate import default_collate

    import autobatch

    sizes: list[int] = []

    def even_only(items):
        sizes.append(len(items))
        if len(items) % 2:
            raise ValueError(f"batch size should be even (got {len(items)})")
        return default_collate(items)

    x, y = classification(n=256, d=8, classes=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, collate_fn=even_only)
    result = autobatch.fit(nn.Linear(8, 3), loader, loss_fn=F.cross_entropy, lr=0.1, epochs=1,
                           initial_batch_size=16, max_batch_size=64, progress=False)
    assert result.samples == 256 and 1 not in sizes
