"""Counting live tensor storage bytes while torch code runs.

One mechanism serves both the memory probe's estimate (on fake tensors, nothing allocated) and
the CPU memory budget (on real tensors): a ``TorchDispatchMode`` sees the output of every aten
op, registers each new untyped storage with a weak reference whose callback subtracts its bytes
when the storage is freed, and keeps the running total and its maximum. Storages that were
already alive before the block (parameters, optimizer state, the input batch) are invisible to
the mode until an op returns them, so callers register them up front with :meth:`track`. A view
op (``split``, ``view``, slicing) allocates nothing: its outputs count only through a storage
already known, so a slice of a large tensor made before the block (fit's step indices are a
slice of the epoch's permutation) does not count its whole storage.

What it cannot see (on any device): memory an op allocates and frees inside itself (kernel
scratch), the CUDA context, cuDNN/cuBLAS workspaces, and allocator caching or fragmentation.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveStorageBytes", "allocation_bytes", "tensors_in"]

# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
_CUDA_BLOCK_BYTES = 512


def allocation_bytes(nbytes: int, device_type: str) -> int:
    """Bytes the device allocator really reserves for a storage of ``nbytes`` bytes."""
    if device_type == "cuda" and nbytes > 0:
        return -(-nbytes // _CUDA_BLOCK_BYTES) * _CUDA_BLOCK_BYTES
    return nbytes


def tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    """Every tensor reachable from ``obj``.

    Modules give their parameters, their gradients and their buffers; optimizers give their
    state tensors; tensors, dicts, lists and tuples are walked recursively.
    """
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from tensors_in(state)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


class LiveStorageBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages on one device (or all) while active.

    Use as a context manager around the code to measure; enter it *after* a FakeTensorMode to
    count fake tensors. ``current_bytes`` and ``peak_bytes`` are in bytes, rounded up as the
    device's allocator would (512-byte blocks on CUDA, exact on CPU).

    Args:
        device: count only storages on this device type ("cpu", "cuda", ...); ``None`` counts
            every device except "meta".
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self.current_bytes = 0
        self.peak_bytes = 0
        # id(storage) -> (weak reference keeping the callback alive, counted bytes)
        self._live: dict[int, tuple[weakref.ref, int]] = {}

    def track(self, *objs: Any) -> int:
        """Register the storages reachable from ``objs`` (see :func:`tensors_in`) as live.

        Returns:
            The bytes newly registered (storages already known are not counted twice).
        """
        before = self.current_bytes
        for obj in objs:
            for t in tensors_in(obj):
                self._add(t)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return self.current_bytes - before

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or (
            self.device_type is not None and t.device.type != self.device_type
        ):
            return
        storage = t.untyped_storage()
        key = id(storage)
        nbytes = allocation_bytes(storage.nbytes(), t.device.type)
        known = self._live.get(key)
        if known is not None:
            if known[1] == nbytes:
                return
            # The storage was resized in place (an out= op): count its new size.
            self.current_bytes += nbytes - known[1]
            self._live[key] = (known[0], nbytes)
            return
        if nbytes == 0:
            return
        ref = weakref.ref(storage, lambda _ref, key=key: self._release(key))
        self._live[key] = (ref, nbytes)
        self.current_bytes += nbytes

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current_bytes -= entry[1]

    def _check(self) -> None:
        """Called after every op's outputs are counted; subclasses may raise here."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        view = func.is_view  # outputs share an input's storage: nothing new is allocated
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not (view and id(t.untyped_storage()) not in self._live):
                self._add(t)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._check()
        return out
