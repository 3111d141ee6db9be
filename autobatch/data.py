"""Turning what users pass as ``data`` into batches of any size.

Every entry point (``fit``, ``measure_noise_scale``, ``probe_memory``, the studies) accepts the
same forms, converted here once:

- a map-style :class:`torch.utils.data.Dataset` whose items are ``(input, target)`` pairs;
- a tuple ``(X, y)`` of tensors or numpy arrays with the examples along dimension 0;
- a :class:`torch.utils.data.DataLoader` (its dataset and ``collate_fn`` are reused; its own
  batch size and sampler are not, since autobatch picks the batch).

A batch is whatever the collate function returns for a list of items: for the usual case a
pair ``(inputs, targets)`` of tensors whose dimension 0 is the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["BatchSource", "as_batch_source", "batch_size_of", "move_to", "split_batch"]


@dataclass
class BatchSource:
    """A dataset plus the function that collates a list of its items into one batch.

    Attributes:
        dataset: map-style dataset of ``(input, target)`` items.
        collate_fn: turns a list of items into a batch.
    """

    dataset: Dataset
    collate_fn: Callable[[list[Any]], Any] = default_collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> Any:
        """Collate the items at ``indices`` (in that order) into one batch."""
        ds = self.dataset
        if isinstance(ds, TensorDataset) and self.collate_fn is default_collate:
            # Fast path: one gather per tensor instead of len(indices) item lookups.
            idx = torch.as_tensor(indices, dtype=torch.long)
            return tuple(t[idx] for t in ds.tensors)
        return self.collate_fn([ds[int(i)] for i in indices])


def _to_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(a))
        # numpy defaults to float64, which no model expects; int64 labels stay as they are.
        return t.float() if t.dtype == torch.float64 else t
    raise TypeError(
        f"data {name} must be a torch.Tensor or numpy.ndarray (got {type(a).__name__}); "
        "pass (X, y) as tensors or arrays, or a map-style Dataset of (input, target) pairs"
    )


def as_batch_source(data: Any, *, name: str = "data") -> BatchSource:
    """Validate ``data`` and return a :class:`BatchSource` over it.

    Args:
        data: a map-style Dataset of ``(input, target)`` pairs, a tuple/list ``(X, y)`` of
            tensors or numpy arrays (examples along dimension 0; float64 arrays become
            float32), a DataLoader (its dataset and collate_fn are reused), or a BatchSource.
        name: the argument's name, used in error messages.

    Raises:
        TypeError: if ``data`` is none of the accepted forms, or its items are not pairs.
        ValueError: if it holds no example, or ``X`` and ``y`` differ in length.
    """
    if isinstance(data, BatchSource):
        source = data
    elif isinstance(data, DataLoader):
        source = BatchSource(data.dataset, data.collate_fn or default_collate)
    elif isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise TypeError(
                f"{name} as a tuple must be (inputs, targets), got a {type(data).__name__} of "
                f"length {len(data)}; pass (X, y) or a Dataset of (input, target) pairs"
            )
        x, y = _to_tensor(data[0], f"{name}[0]"), _to_tensor(data[1], f"{name}[1]")
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{name} inputs and targets must have the same length along dimension 0 "
                f"(got shapes {tuple(x.shape)} and {tuple(y.shape)})"
            )
        source = BatchSource(TensorDataset(x, y))
    elif isinstance(data, Dataset) and hasattr(data, "__getitem__"):
        source = BatchSource(data)
    else:
        raise TypeError(
            f"{name} must be a map-style Dataset of (input, target) pairs, a tuple (X, y) of "
            f"tensors or arrays, or a DataLoader (got {type(data).__name__})"
        )
    try:
        n = len(source)
    except TypeError as err:
        raise TypeError(
            f"{name} has no length (an IterableDataset?); autobatch needs a map-style Dataset "
            "so that batches of any size can be drawn"
        ) from err
    if n == 0:
        raise ValueError(f"{name} is empty (0 examples); pass at least one (input, target) pair")
    first = source.dataset[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise TypeError(
            f"{name} items must be (input, target) pairs (item 0 is a {type(first).__name__}"
            f"{' of length ' + str(len(first)) if isinstance(first, (tuple, list)) else ''}); "
            "wrap your dataset so that __getitem__ returns (input, target)"
        )
    return source


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the size of dimension 0 of its first tensor."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            raise ValueError("a 0-d tensor has no batch dimension; put examples along dim 0")
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size_of(batch[0])
    raise TypeError(f"cannot find a batch dimension in a {type(batch).__name__}")


def move_to(batch: Any, device: torch.device | str | None) -> Any:
    """Move every tensor of a (nested) batch to ``device``; ``None`` leaves it in place."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def split_batch(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """Split a batch along dimension 0 into consecutive pieces of the given sizes."""
    if isinstance(batch, torch.Tensor):
        return list(torch.split(batch, list(sizes)))
    if isinstance(batch, dict):
        parts = {k: split_batch(v, sizes) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(len(sizes))]
    if isinstance(batch, (tuple, list)):
        columns = [split_batch(v, sizes) for v in batch]
        return [type(batch)(col[i] for col in columns) for i in range(len(sizes))]
    raise TypeError(f"cannot split a {type(batch).__name__} along a batch dimension")
