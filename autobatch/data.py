"""Turning what users pass as ``data`` into batches of any size.

Every entry point (``fit``, ``measure_noise_scale``, ``probe_memory``, ``evaluate``, the
studies) accepts the same forms, converted here once:

- a map-style :class:`torch.utils.data.Dataset` whose items are tuples ``(input, target)`` or
  ``(x1, ..., xk, target)``, or dicts (``{"input_ids": ..., "labels": ...}``);
- a tuple ``(X, y)`` or ``(X1, ..., Xk, y)`` of tensors or numpy arrays with the examples
  along dimension 0;
- a dict ``{name: tensor}`` of tensors with the examples along dimension 0 (batches are dicts);
- a :class:`torch.utils.data.DataLoader`: its dataset and ``collate_fn`` are reused (the
  collate function sees the items of one micro-batch, so it pads each micro-batch to its own
  longest item), its batch size is not (autobatch picks the batch). A ``sampler`` that is
  not plain sequential or shuffled order (e.g. ``WeightedRandomSampler``) is kept as
  :attr:`BatchSource.sampler` and draws each epoch's order; a custom ``batch_sampler`` or a
  ``DistributedSampler`` is refused with an error saying why. Its worker settings
  (``num_workers``, ``pin_memory``, ``persistent_workers``, ``prefetch_factor``,
  ``worker_init_fn``, ``multiprocessing_context``, ``timeout``) are kept as
  :attr:`BatchSource.loader_options`, and ``fit`` loads with them.

How a batch becomes a loss is :mod:`autobatch.batch`'s business; this module only builds
batches (:meth:`BatchSource.batch`) and moves, splits and measures them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
)
from torch.utils.data._utils.collate import default_collate

__all__ = ["BatchSource", "TensorDictDataset", "as_batch_source", "batch_size_of", "move_to",
           "split_batch"]


class TensorDictDataset(Dataset):
    """Examples stored as a dict of tensors, examples along dimension 0; items are dicts."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)
        self._n = len(next(iter(self.tensors.values())))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


@dataclass
class BatchSource:
    """A dataset plus the function that collates a list of its items into one batch.

    Attributes:
        dataset: map-style dataset; items are tuples or dicts (see the module docstring).
        collate_fn: turns a list of items into a batch.
        sampler: the user's sampler (from a DataLoader) drawing each epoch's order of
            examples, or None for autobatch's own seeded shuffling. See :meth:`sampler_order`.
        loader_options: the DataLoader's worker settings, as its keyword arguments
            (``num_workers``, ``pin_memory``, ``persistent_workers``, ...); empty for data
            that came without a DataLoader.
    """

    dataset: Dataset
    collate_fn: Callable[[list[Any]], Any] = default_collate
    sampler: Sampler | None = None
    loader_options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> Any:
        """Collate the items at ``indices`` (in that order) into one batch."""
        ds = self.dataset
        if self.collate_fn is default_collate and isinstance(ds, (TensorDataset, TensorDictDataset)):
            # Fast path: one gather per tensor instead of len(indices) item lookups.
            idx = (indices if isinstance(indices, torch.Tensor) and indices.dtype == torch.long
                   else torch.as_tensor(indices, dtype=torch.long))
            if isinstance(ds, TensorDictDataset):
                return {k: t[idx if t.device == idx.device else idx.to(t.device)] for k, t in ds.tensors.items()}
            return tuple([t[idx if t.device == idx.device else idx.to(t.device)] for t in ds.tensors])
        items = [ds[int(i)] for i in indices]
        if self.collate_fn is not default_collate:
            return self.collate_fn(items)
        try:
            return default_collate(items)
        except RuntimeError as err:  # torch's "stack expects each tensor to be equal size"
            differ = _unequal_field(items, [int(i) for i in indices])
            if differ is None:
                raise
            raise ValueError(
                f"cannot stack the dataset's items into one batch: {differ}, and the default collation "
                "stacks equal shapes only; pass a DataLoader whose collate_fn pads each batch, e.g. "
                "DataLoader(dataset, collate_fn=pad) (autobatch uses its dataset and collate_fn, not its "
                "batch size), or make the items equal in length"
            ) from err

    def on_device(self, device: torch.device) -> bool:
        """Whether every batch :meth:`batch` returns is already on ``device`` (in-memory
        tensors there, collated by the fast path), so it need not be moved."""
        ds = self.dataset
        if self.collate_fn is not default_collate or not isinstance(ds, (TensorDataset, TensorDictDataset)):
            return False
        tensors = ds.tensors.values() if isinstance(ds, TensorDictDataset) else ds.tensors
        return all(t.device == device for t in tensors)

    def sampler_order(self, epoch: int, seed: int = 0) -> torch.Tensor:
        """One epoch of the user's sampler: the indices it yields, as an int64 tensor.

        The sampler runs with the torch RNG seeded by ``seed + epoch`` (the global RNG is
        restored afterwards), so the order is a function of ``(seed, epoch)`` as autobatch's
        own shuffling is, unless the sampler holds a generator of its own. A sampler with
        ``set_epoch`` is told the epoch first. The epoch's length is the sampler's (e.g.
        ``WeightedRandomSampler(num_samples=...)``), not necessarily the dataset's.

        Raises:
            ValueError: if there is no sampler, it yields nothing, or an index is out of range.
        """
        if self.sampler is None:
            raise ValueError("this BatchSource has no sampler; the order is autobatch's own")
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + epoch)
            order = torch.as_tensor([int(i) for i in self.sampler], dtype=torch.long)
        if order.numel() == 0 or int(order.min()) < 0 or int(order.max()) >= len(self):
            raise ValueError(
                f"the DataLoader's sampler ({type(self.sampler).__name__}) yielded "
                f"{order.numel()} indices, some outside [0, {len(self)}) or none at all; it "
                "must yield example indices of the dataset"
            )
        return order


def _unequal_field(items: list[Any], indices: list[int]) -> str | None:
    """Which field of ``items`` (a dict key, or a tuple position) differs in shape between two
    of them, said with both shapes and the items' dataset indices; None if none does."""
    def fields(item: Any) -> dict[str, Any]:
        if isinstance(item, Mapping):
            return {f"field {k!r}": v for k, v in item.items()}
        if isinstance(item, (tuple, list)):
            return {f"element {i}": v for i, v in enumerate(item)}
        return {"the item": item}

    def shape(value: Any) -> tuple[int, ...] | None:
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return tuple(value.shape)
        return (len(value),) if isinstance(value, (list, tuple)) else None

    first = fields(items[0])
    for item, index in zip(items[1:], indices[1:]):
        for name, value in fields(item).items():
            a, b = shape(first.get(name)), shape(value)
            if a is not None and b is not None and a != b:
                return f"{name} has shape {a} in item {indices[0]} and {b} in item {index}"
    return None


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


def _same_length(tensors: dict[str, torch.Tensor], name: str) -> None:
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if any(len(s) == 0 for s in shapes.values()) or len({s[0] for s in shapes.values()}) > 1:
        listed = " and ".join(str(s) for s in shapes.values())
        raise ValueError(
            f"{name} tensors must have the same length along dimension 0 (got shapes {listed})"
        )


def _from_loader(loader: DataLoader, name: str) -> BatchSource:
    if loader.batch_sampler is None:
        raise TypeError(
            f"{name} is a DataLoader with batch_size=None, whose items are ready-made batches; "
            "autobatch collates its own batches from single items: pass a DataLoader with a "
            "batch_size (any; it is not used) or the Dataset itself"
        )
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
        raise TypeError(
            f"{name} has a custom batch_sampler ({type(loader.batch_sampler).__name__}), which "
            "autobatch cannot follow since it picks the batch size itself; pass the order as a "
            "per-example sampler instead (DataLoader(dataset, sampler=..., batch_size=1)) or "
            "group examples of similar length in the dataset"
        )
    sampler: Sampler | None = loader.sampler
    if type(sampler).__name__ == "DistributedSampler":
        raise TypeError(
            f"{name} has a DistributedSampler; autobatch shards every step across ranks itself "
            "under torchrun, so pass the DataLoader without it (or the dataset)"
        )
    plain_shuffle = (type(sampler) is RandomSampler and not sampler.replacement
                     and sampler._num_samples is None and sampler.generator is None)
    if type(sampler) is SequentialSampler or plain_shuffle:
        sampler = None  # order is autobatch's own (config.data.shuffle, seeded)
    options = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
               "persistent_workers": loader.persistent_workers, "timeout": loader.timeout}
    if loader.num_workers > 0:  # settings a DataLoader accepts only with workers
        options.update(prefetch_factor=loader.prefetch_factor, worker_init_fn=loader.worker_init_fn,
                       multiprocessing_context=loader.multiprocessing_context)
    return BatchSource(loader.dataset, loader.collate_fn or default_collate, sampler, options)


def as_batch_source(data: Any, *, name: str = "data", check_items: bool = True) -> BatchSource:
    """Validate ``data`` and return a :class:`BatchSource` over it.

    Args:
        data: any form listed in the module docstring, or a BatchSource. Numpy float64 arrays
            become float32.
        name: the argument's name, used in error messages.
        check_items: require items the batch protocol understands (tuples of at least two
            elements, or dicts). Pass False when a ``forward_loss`` interprets the batches.

    Raises:
        TypeError: if ``data`` is none of the accepted forms, or its items are of a form the
            batch protocol cannot read (the message says how to fix it).
        ValueError: if it holds no example, or its tensors differ in length.
    """
    if isinstance(data, BatchSource):
        source = data
    elif isinstance(data, DataLoader):
        source = _from_loader(data, name)
    elif isinstance(data, (tuple, list)):
        if len(data) < 2 and check_items:
            raise TypeError(
                f"{name} as a tuple must be (inputs, targets) or (x1, ..., xk, targets), got a "
                f"{type(data).__name__} of length {len(data)}; pass (X, y), or a forward_loss "
                "that reads the batch itself"
            )
        tensors = {f"{name}[{i}]": _to_tensor(a, f"{name}[{i}]") for i, a in enumerate(data)}
        _same_length(tensors, name)
        source = BatchSource(TensorDataset(*tensors.values()))
    elif isinstance(data, Mapping):
        tensors = {k: _to_tensor(v, f"{name}[{k!r}]") for k, v in data.items()}
        if not tensors:
            raise ValueError(f"{name} is an empty dict; pass {{name: tensor}} with examples along dim 0")
        _same_length(tensors, name)
        source = BatchSource(TensorDictDataset(tensors))
    elif isinstance(data, Dataset) and hasattr(data, "__getitem__"):
        source = BatchSource(data)
    else:
        raise TypeError(
            f"{name} must be a map-style Dataset (items (input, target), (x1, ..., xk, target) "
            f"or dicts), a tuple (X, y) or dict of tensors or arrays, or a DataLoader (got "
            f"{type(data).__name__})"
        )
    try:
        n = len(source)
    except TypeError as err:
        raise TypeError(
            f"{name} has no length (an IterableDataset?); autobatch needs a map-style Dataset "
            "so that batches of any size can be drawn"
        ) from err
    if n == 0:
        raise ValueError(f"{name} is empty (0 examples); pass at least one example")
    first = source.dataset[0]
    readable = isinstance(first, Mapping) or (isinstance(first, (tuple, list)) and len(first) >= 2)
    if check_items and not readable:
        length = f" of length {len(first)}" if isinstance(first, (tuple, list)) else ""
        raise TypeError(
            f"{name} items must be (input, target) pairs, (x1, ..., xk, target) tuples or dicts "
            f"(item 0 is a {type(first).__name__}{length}); wrap your dataset so that "
            "__getitem__ returns one of those, or pass forward_loss=f(model, batch) -> loss"
        )
    return source


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the size of dimension 0 of its first tensor."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            raise ValueError("a 0-d tensor has no batch dimension; put examples along dim 0")
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for value in batch.values():
            try:
                return batch_size_of(value)
            except TypeError:
                continue
    if isinstance(batch, (tuple, list)):
        for value in batch:
            try:
                return batch_size_of(value)
            except TypeError:
                continue
    raise TypeError(f"cannot find a batch dimension in a {type(batch).__name__}")


def move_to(batch: Any, device: torch.device | str | None) -> Any:
    """Move every tensor of a (nested) batch to ``device``; ``None`` leaves it in place.

    Mappings (dicts, Hugging Face ``BatchEncoding``) come back as plain dicts.
    """
    if device is None:
        return batch
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def split_batch(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """Split a batch along dimension 0 into consecutive pieces of the given sizes.

    Non-tensor leaves (e.g. a list of strings in a dict batch) are split as lists when their
    length is the batch's, and repeated in every piece otherwise.
    """
    if isinstance(batch, torch.Tensor):
        return list(torch.split(batch, list(sizes)))
    if isinstance(batch, Mapping):
        parts = {k: split_batch(v, sizes) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(len(sizes))]
    if isinstance(batch, (tuple, list)):
        if batch and not any(isinstance(v, (torch.Tensor, Mapping, tuple, list)) for v in batch):
            if len(batch) != sum(sizes):
                raise TypeError(f"cannot split a {type(batch).__name__} of {len(batch)} "
                                f"values into pieces of {list(sizes)}")
            bounds = np.cumsum([0, *sizes]).tolist()
            return [batch[a:b] for a, b in itertools.pairwise(bounds)]
        columns = [split_batch(v, sizes) for v in batch]
        return [type(batch)(col[i] for col in columns) for i in range(len(sizes))]
    return [batch] * len(sizes)
