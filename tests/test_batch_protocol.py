"""The batch protocol, loss-unit accumulation, data sources, the optimizer spec, evaluate and
the save/restore helper, each against a reference computed another way."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from autobatch._state import preserved_state
from autobatch.accumulate import accumulate_gradients, count_loss_items
from autobatch.batch import check_scalar_loss, forward_and_loss
from autobatch.data import as_batch_source
from autobatch.evaluate import evaluate
from autobatch.optimizers import build_optimizer, copy_for
from autobatch.testing import USER_MODELS, TwoInputNet, token_loss


# ---------------------------------------------------------------------------- the protocol
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


# ---------------------------------------------------------------------------- data sources
class _Items(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_dicts_k_tuples_and_tensor_dicts_give_the_same_batches() -> None:
    x1, x2, y = torch.randn(7, 3), torch.randn(7, 2), torch.arange(7)
    idx = [5, 0, 3]
    from_tuple = as_batch_source((x1, x2, y)).batch(idx)
    from_items = as_batch_source(_Items([(x1[i], x2[i], y[i]) for i in range(7)])).batch(idx)
    for a, b, ref in zip(from_tuple, from_items, (x1[idx], x2[idx], y[idx])):
        assert torch.equal(a, ref) and torch.equal(b, ref)
    from_dict = as_batch_source({"a": x1, "labels": y}).batch(idx)
    from_dict_items = as_batch_source(_Items([{"a": x1[i], "labels": y[i]} for i in range(7)])).batch(idx)
    for batch in (from_dict, from_dict_items):
        assert set(batch) == {"a", "labels"}
        assert torch.equal(batch["a"], x1[idx]) and torch.equal(batch["labels"], y[idx])


def test_a_collate_fn_pads_each_micro_batch_to_its_own_longest_item() -> None:
    source = as_batch_source(USER_MODELS["padded_lm"]().data)
    lengths = [len(source.dataset[i][0]) for i in range(len(source))]
    short = sorted(range(len(source)), key=lambda i: lengths[i])[:4]
    x, y = source.batch(short)
    assert x.shape[1] == max(lengths[i] for i in short) < max(lengths)
    assert int((y != -100).sum()) == sum(lengths[i] for i in short)


def test_samplers_are_honoured_and_what_cannot_be_is_refused() -> None:
    ds = TensorDataset(torch.randn(100, 2), (torch.arange(100) >= 90).long())  # class 1: 10%
    weights = torch.where(ds.tensors[1] == 1, 9.0, 1.0)  # class 1 drawn half the time
    source = as_batch_source(DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler(weights, 4000)))
    order = source.sampler_order(epoch=0, seed=0)
    assert len(order) == 4000
    assert float(ds.tensors[1][order].float().mean()) == pytest.approx(0.5, abs=0.03)
    assert torch.equal(order, source.sampler_order(0, seed=0))  # a function of (seed, epoch)
    assert not torch.equal(order, source.sampler_order(1, seed=0))

    for plain in (DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=4, shuffle=True)):
        assert as_batch_source(plain).sampler is None  # autobatch's own (seeded) order
    with pytest.raises(TypeError, match=r"custom batch_sampler \(BatchSampler\).*sampler="):
        as_batch_source(DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 3, False)))
    with pytest.raises(TypeError, match=r"batch_size=None, whose items are ready-made batches"):
        as_batch_source(DataLoader(ds, batch_size=None))
    from torch.utils.data.distributed import DistributedSampler

    with pytest.raises(TypeError, match="DistributedSampler; autobatch shards every step"):
        as_batch_source(DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=2, rank=0)))
    replacement = DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, replacement=True))
    assert as_batch_source(replacement).sampler is not None


# ---------------------------------------------------------------------------- loss items
def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ["gpt2", "bert_mlm", "padded_lm"])
def test_accumulated_micro_batches_equal_the_big_batch_token_mean(name: str) -> None:
    case = USER_MODELS[name]()
    model, source = case.model, as_batch_source(case.data)
    # Length-sorted indices: micro-batches of very different token counts (the worst case).
    lengths = torch.tensor([len(next(iter(source.dataset[i].values())) if isinstance(source.dataset[i], dict)
                                else source.dataset[i][0]) for i in range(32)])
    indices = torch.argsort(lengths)
    model.zero_grad()
    loss, _ = forward_and_loss(model, source.batch(indices), case.loss_fn)  # padded to the longest
    loss.backward()
    reference = _flat_grad(model)
    for sizes in ([8, 8, 8, 8], [3, 5, 7, 17], [1] * 4 + [28]):
        model.zero_grad()
        done = accumulate_gradients(model, [source.batch(c) for c in indices.split(sizes)],
                                    loss_fn=case.loss_fn, loss_items=case.loss_items)
        error = float((_flat_grad(model) - reference).norm() / reference.norm())
        assert error < 1e-5, (sizes, error)
        assert float(done.loss) == pytest.approx(loss.item(), rel=1e-5)  # the step's token mean
    # The test can fail: weighting by examples (the old rule) is off by far more.
    model.zero_grad()
    accumulate_gradients(model, [source.batch(c) for c in indices.split([3, 5, 7, 17])],
                         loss_fn=case.loss_fn, loss_items="examples")
    assert float((_flat_grad(model) - reference).norm() / reference.norm()) > 1e-3


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


def test_a_micro_batch_without_loss_items_is_skipped_not_nan() -> None:
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))
    x = torch.randint(8, (4, 5))
    y = x.clone()
    y[:2] = -100  # the first micro-batch has nothing to learn from
    model.zero_grad()
    token_loss(model(x[2:]), y[2:]).backward()
    reference = _flat_grad(model)
    model.zero_grad()
    done = accumulate_gradients(model, [(x[:2], y[:2]), (x[2:], y[2:])], loss_fn=token_loss,
                                loss_items="tokens")
    assert done.items == [0, 10] and torch.allclose(_flat_grad(model), reference)


# ---------------------------------------------------------------------------- optimizers
def test_optimizer_specs_class_factory_partial_and_instance() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    params = list(model.parameters())
    opt = build_optimizer(torch.optim.SGD, params, lr=0.3)
    assert opt.param_groups[0]["lr"] == 0.3 and len(opt.param_groups[0]["params"]) == 2  # trainable only
    held = build_optimizer(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), params)
    assert (held.param_groups[0]["lr"], held.param_groups[0]["momentum"]) == (0.1, 0.9)
    over = build_optimizer(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), params, lr=0.5)
    assert (over.param_groups[0]["lr"], over.param_groups[0]["momentum"]) == (0.5, 0.9)
    no_lr = build_optimizer(lambda ps: torch.optim.Adam(ps, lr=1e-2), params, lr=2e-3)
    assert no_lr.param_groups[0]["lr"] == 2e-3
    positional = build_optimizer(lambda ps, lr: torch.optim.SGD(ps, lr=lr), params, lr=0.7)
    assert positional.param_groups[0]["lr"] == 0.7
    instance = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert build_optimizer(instance, params, lr=5e-4) is instance and instance.param_groups[0]["lr"] == 5e-4
    with pytest.raises(ValueError, match=r"lr is required with an optimizer class \(SGD\).*functools.partial"):
        build_optimizer(torch.optim.SGD, params)
    with pytest.raises(ValueError, match="lr is required: the optimizer factory"):
        build_optimizer(lambda ps, lr: torch.optim.SGD(ps, lr=lr), params)
    with pytest.raises(ValueError, match=r"lr must be > 0 \(got lr=0\)"):
        build_optimizer(torch.optim.SGD, params, lr=0)
    with pytest.raises(ValueError, match="holds tensors that are not the model's parameters"):
        build_optimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), params)


def test_an_instance_is_copied_faithfully_per_param_group() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    decay, no_decay = list(model[0].parameters()), list(model[1].parameters())
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                               {"params": no_decay, "weight_decay": 0.0, "lr": 1e-4}],
                              lr=3e-4, betas=(0.8, 0.95), amsgrad=True)
    with pytest.raises(TypeError, match="decoupled_weight_decay"):  # the old rebuild
        type(adamw)(list(model.parameters()), **adamw.defaults)
    stand_ins = {p: p.detach().clone().requires_grad_() for p in model.parameters()}
    copy = copy_for(adamw, stand_ins)
    assert type(copy) is torch.optim.AdamW and not copy.state
    for ours, theirs in zip(copy.param_groups, adamw.param_groups):
        assert [id(p) for p in ours["params"]] == [id(stand_ins[p]) for p in theirs["params"]]
        assert {k: v for k, v in ours.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}

    class NeedsArg(torch.optim.SGD):
        def __init__(self, params, scale, lr=0.1):
            super().__init__(params, lr=lr * scale)

    with pytest.raises(TypeError, match=r"cannot rebuild NeedsArg from its param groups .* factory"):
        copy_for(NeedsArg(model.parameters(), 2.0), stand_ins)


# ---------------------------------------------------------------------------- evaluate
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


# ---------------------------------------------------------------------------- state
def test_preserved_state_restores_everything_a_measurement_touches() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model[1].eval()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    opt_state = [s["exp_avg"].clone() for s in opt.state.values()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for offload in (False, True):
        with preserved_state(model, opt, weights=True, offload=offload, train=True):
            assert all(p.grad is None for p in model.parameters()) and model[1].training
            model(torch.randn(8, 3)).sum().backward()  # BatchNorm stats move, dropout draws
            opt.step()
            random.random(), np.random.rand()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert [m.training for m in model] == [True, False, True, True]
        assert next(iter(opt.state.values()))["exp_avg"].equal(opt_state[0])
        assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
        assert np.array_equal(np.random.get_state()[1], rng[2])
        if not offload:
            assert all(p.grad is g for p, g in zip(model.parameters(), grads))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_streaming_and_data_parallel_denominators() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(12, 4), torch.randint(3, (12,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    reference = _flat_grad(model)
    pulled = []

    def lazily():  # examples mode with the step size known: collated one at a time
        for chunk in torch.arange(12).split(5):
            pulled.append(len(chunk))
            yield x[chunk], y[chunk]

    model.zero_grad()
    done = accumulate_gradients(model, lazily(), loss_fn=F.cross_entropy, step_examples=12,
                                after_backward=lambda m: pulled.append(("backward", m.index)))
    assert pulled == [5, ("backward", 0), 5, ("backward", 1), 2, ("backward", 2)]
    assert torch.allclose(_flat_grad(model), reference) and done.total_items == 12
    # Two ranks holding the same data: each rank's share weighs half of the global mean.
    model.zero_grad()
    tokens = accumulate_gradients(model, [(x[:6], y[:6]), (x[6:], y[6:])], loss_fn=F.cross_entropy,
                                  loss_items="tokens", all_reduce_items=lambda n: 2 * n)
    assert tokens.total_items == 24 and torch.allclose(_flat_grad(model), reference / 2)
