"""autobatch.data: every form of user data becomes the same batches, samplers are honoured,
and what cannot be used is named."""

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from autobatch.data import as_batch_source, batch_size_of, move_to, split_batch
from autobatch.testing import USER_MODELS


def test_tuple_of_arrays_becomes_float32_inputs_and_keeps_labels() -> None:
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    y = np.arange(6)
    src = as_batch_source((x, y))
    xb, yb = src.batch([4, 1])
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert xb.tolist() == [[8.0, 9.0], [2.0, 3.0]] and yb.tolist() == [4, 1]


def test_dataset_and_dataloader_give_the_same_batches() -> None:
    ds = TensorDataset(torch.randn(10, 3), torch.arange(10))

    class Plain(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return ds[i]

    fast = as_batch_source(ds).batch([3, 7, 0])
    slow = as_batch_source(Plain()).batch([3, 7, 0])
    loader = as_batch_source(DataLoader(Plain(), batch_size=4)).batch([3, 7, 0])
    for a, b, c in zip(fast, slow, loader):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "data,exc,match",
    [
        ((np.zeros((0, 2)), np.zeros(0)), ValueError, "empty"),
        ((np.zeros((3, 2)), np.zeros(4)), ValueError, r"shapes \(3, 2\) and \(4,\)"),
        ((np.zeros((3, 2)),), TypeError, "length 1"),
        ([1, 2], TypeError, "data\\[0\\] must be a torch.Tensor"),
        (TensorDataset(torch.zeros(3, 2)), TypeError, "must be \\(input, target\\) pairs"),
        ("hello", TypeError, "got str"),
    ],
)
def test_bad_data_is_named(data, exc, match) -> None:
    with pytest.raises(exc, match=match):
        as_batch_source(data)


def test_split_move_and_size_on_nested_batches() -> None:
    batch = ({"a": torch.arange(6), "b": torch.zeros(6, 2)}, torch.arange(6))
    parts = split_batch(batch, [2, 4])
    assert [batch_size_of(p) for p in parts] == [2, 4]
    assert parts[1][0]["a"].tolist() == [2, 3, 4, 5]
    assert move_to(batch, "cpu")[1].device.type == "cpu"
    with pytest.raises(ValueError, match="0-d tensor"):
        batch_size_of(torch.tensor(1.0))


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
