import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from autobatch.data import as_batch_source, batch_size_of, move_to, split_batch
from autobatch.devices import canonical_device


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


def test_canonical_device_gives_the_index_tensors_report(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found on an H200: fit(device="cuda") with the model on cuda:0 failed the probe's
    # same-device check, because torch.device("cuda") != torch.device("cuda:0").
    assert torch.device("cuda") != torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert canonical_device("cuda") == torch.device("cuda", 1)
    assert canonical_device(torch.device("cuda")) == torch.device("cuda:1")
    assert canonical_device("cuda:0") == torch.device("cuda", 0)  # an explicit index stays
    assert canonical_device("cpu") == torch.device("cpu") == torch.zeros(1).device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert canonical_device("cuda") == torch.device("cuda")  # left for the caller to report
