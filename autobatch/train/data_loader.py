"""``fit``'s data: the seeded sample order, a step's indices, and its micro-batches collated.

- :func:`setup_sample_stream`: the order of examples (autobatch's seeded shuffle, or a
  DataLoader sampler's), any B, nothing skipped or repeated when B changes;
- :func:`take_step`: the next step's indices, with an epoch's tail too small for the model
  carried into the next step (or dropped);
- :class:`MicroBatchLoader`: a step's micro-batches, collated in the main process or by
  DataLoader workers.
"""

from __future__ import annotations

from typing import Literal

import torch

from autobatch.data import BatchSource
from autobatch.train.sampler import SampleStream

__all__ = ["MicroBatchLoader", "setup_sample_stream", "take_step"]


def setup_sample_stream(source: BatchSource, *, shuffle: bool, seed: int) -> SampleStream:
    """The seeded sample order, or the DataLoader sampler's (one epoch = one pass of it)."""
    if source.sampler is None:
        return SampleStream(len(source), shuffle=shuffle, seed=seed)
    first = source.sampler_order(0, seed)
    return SampleStream(len(first), seed=seed, order=lambda epoch: source.sampler_order(epoch, seed))


def take_step(stream: SampleStream, batch_size: int, smallest: int,
              small_tail: Literal["carry", "drop"]) -> tuple[torch.Tensor, int]:
    """The next step's indices (global), and 1 if an epoch's tail smaller than ``smallest``
    examples (a step too small for the model, e.g. one example for BatchNorm) was carried
    into it or dropped, else 0."""
    indices = stream.take(batch_size)
    if indices.shape[0] >= smallest:
        return indices, 0
    if small_tail == "drop":
        return stream.take(batch_size), 1
    return torch.cat([indices, stream.take(batch_size - indices.shape[0])]), 1


class MicroBatchLoader:
    """Collates a step's micro-batches, in the main process or with DataLoader workers.

    With workers, one DataLoader serves every step: its batch sampler is pointed at the
    step's micro-batch index lists, so workers collate them in parallel while the order stays
    exactly the stream's. The workers live from step to step; with the user's
    ``persistent_workers=False`` they are restarted at each epoch (:meth:`new_epoch`), as
    the user's DataLoader would, so per-epoch worker state (``worker_init_fn``, a dataset's
    copy in each worker) is made afresh.

    Args:
        source: the training data; its :attr:`~autobatch.data.BatchSource.loader_options`
            (a DataLoader's ``num_workers``, ``pin_memory``, ``persistent_workers``,
            ``prefetch_factor``, ``worker_init_fn``, ...) are followed.
        num_workers: worker processes (0: collate in the main process); None takes the
            DataLoader's own ``num_workers`` (0 for data that came without one).
        pin: pin collated batches in page-locked memory (for a CUDA device), unless the
            DataLoader said ``pin_memory=False``.
    """

    def __init__(self, source: BatchSource, num_workers: int | None, *, pin: bool) -> None:
        self.source = source
        self._plan: list[list[int]] = []
        self._loader = None
        options = dict(source.loader_options)
        own = options.pop("num_workers", 0)  # the user's DataLoader's (0 without one)
        workers = own if num_workers is None else num_workers
        persistent = options.pop("persistent_workers", True)
        pin = options.pop("pin_memory", True) and pin
        if own == 0:  # fit(num_workers=) on data without worker settings: autobatch's defaults
            options, persistent = {}, True
        self._restart_each_epoch = not persistent
        if workers > 0:
            self._loader = torch.utils.data.DataLoader(
                source.dataset, batch_sampler=_PlanSampler(self), num_workers=workers,
                collate_fn=source.collate_fn, persistent_workers=True, pin_memory=pin, **options,
            )

    def new_epoch(self) -> None:
        """Called when a step starts a new epoch: restarts the workers if the user's
        DataLoader did not keep them (``persistent_workers=False``)."""
        if self._restart_each_epoch:
            self.close()
            if self._loader is not None:
                self._loader._iterator = None  # the next step starts new workers

    def micro_batches(self, indices: torch.Tensor, sizes: list[int]):
        """Yield the collated micro-batches of ``indices`` cut into ``sizes``, in order."""
        chunks = torch.split(indices, sizes) if len(sizes) > 1 else (indices,)
        if self._loader is None:
            for chunk in chunks:
                yield self.source.batch(chunk)
            return
        self._plan = [c.tolist() for c in chunks]
        yield from self._loader

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._loader is not None and self._loader._iterator is not None:
            self._loader._iterator._shutdown_workers()  # type: ignore[attr-defined]


class _PlanSampler:
    def __init__(self, owner: MicroBatchLoader) -> None:
        self.owner = owner

    def __iter__(self):
        return iter(self.owner._plan)

    def __len__(self) -> int:
        return len(self.owner._plan)
