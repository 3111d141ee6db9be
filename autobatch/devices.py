"""Devices and precision, the one place every entry point asks.

- :func:`model_device`: where a model's parameters live (the device batches are moved to);
- :func:`canonical_device`: a device as the tensors on it report it (``cuda`` -> ``cuda:0``);
- :data:`AUTOCAST_DTYPES` and :func:`autocast`: ``precision`` (``"fp32"``, ``"bf16"``,
  ``"fp16"``) as the dtype forward passes and losses autocast to.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["AUTOCAST_DTYPES", "autocast", "canonical_device", "model_device"]

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``precision`` (fit's, the memory probe's) -> the dtype the forward and loss autocast to
(None: no autocast)."""


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters).

    Under FSDP2 the parameters are DTensors; their device is the rank's own (their local
    shards'), which is where batches go.
    """
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def canonical_device(device: torch.device | str | int) -> torch.device:
    """``device`` as the tensors on it report it: an accelerator device without an index
    (``"cuda"``) gets the backend's current index (``cuda:0``), since a tensor is always on an
    indexed device and ``torch.device("cuda") != torch.device("cuda:0")``. CPU and meta
    devices, and devices that already have an index, come back unchanged."""
    dev = torch.device(device)
    if dev.index is not None or dev.type in ("cpu", "meta"):
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not backend.is_available():
        return dev  # the caller reports the missing device with its own context
    current = getattr(backend, "current_device", None)
    return torch.device(dev.type, current() if current is not None else 0)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context for None
    (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
