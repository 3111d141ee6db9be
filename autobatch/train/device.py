"""``fit``'s setup of where and how a step runs: the device, the precision, and the
micro-batch cap the memory probe finds. Plain functions returning plain values.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from autobatch.batch import ForwardLoss, LossFn
from autobatch.config import FitConfig
from autobatch.data import BatchSource
from autobatch.devices import AUTOCAST_DTYPES, canonical_device
from autobatch.memory.probe import MemoryProbeResult, probe_memory
from autobatch.noise.micro_batch import trainable_parameters
from autobatch.optimizers import OptimizerSpec, build_optimizer

__all__ = ["setup_device", "setup_micro_batch_cap", "setup_precision"]


def setup_device(model: nn.Module, source: BatchSource, device: torch.device | str | None) -> torch.device:
    """Where training runs: ``device`` if given (the model is moved there by the caller),
    else the model's own device, which in-memory data tensors must share.

    Raises:
        ValueError: for a model with no trainable parameter, or data tensors on another
            device than the model when ``device`` is None.
    """
    model_device = trainable_parameters(model)[0].device  # raises if nothing is trainable
    if device is not None:
        return canonical_device(device)
    tensors = getattr(source.dataset, "tensors", None)
    if isinstance(tensors, dict):
        tensors = list(tensors.values())
    if tensors and tensors[0].device != model_device:
        raise ValueError(
            f"model is on {model_device} but the data tensors are on {tensors[0].device}; pass "
            f"device='{model_device}' (fit moves each batch there) or move the data"
        )
    return model_device


def setup_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``(autocast dtype, GradScaler)`` for ``precision``: ``(None, None)`` for ``"fp32"``,
    ``(bfloat16, None)`` for ``"bf16"``, ``(float16, GradScaler)`` for ``"fp16"`` (CUDA only).

    Raises:
        ValueError: for an unknown precision, or fp16 off CUDA.
    """
    if not isinstance(precision, str) or precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16' (got precision={precision!r})")
    if precision != "fp16":
        return AUTOCAST_DTYPES[precision], None
    if device.type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device (got device={device}); use "
            "precision='bf16' on CPU"
        )
    return AUTOCAST_DTYPES[precision], torch.amp.GradScaler("cuda")


def setup_micro_batch_cap(model: nn.Module, source: BatchSource, cfg: FitConfig, device: torch.device, *,
                          loss_fn: LossFn | None, forward_loss: ForwardLoss | None, optimizer: OptimizerSpec,
                          lr: float | None, max_batch_size: int, precision: str,
                          sharded: bool = False) -> tuple[int | None, int, MemoryProbeResult | None]:
    """``(cap, smallest, probe)``: the largest micro-batch a step may run (per process; None: no
    cap), the smallest one the model trains on (2 for BatchNorm, else 1), and the probe's
    result (None when it did not run).

    The memory probe runs when ``cfg.memory.probe_memory`` says so (default: on accelerators,
    or with a ``memory_budget``), at the step's ``precision``, with the user's optimizer spec
    (an instance is rebuilt faithfully over stand-ins, :func:`autobatch.optimizers.copy_for`;
    a class or factory gets ``lr``); its answer is bounded by ``max_micro_batch_size``. A
    model sharded with FSDP2 is not probed (its step's memory is per process: shards plus the
    largest all-gathered unit); an out-of-memory micro-batch still halves the cap.

    Raises:
        ValueError: ``probe_memory=True`` for a sharded model.
    """
    cap = cfg.memory.max_micro_batch_size
    smallest = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    should = cfg.memory.probe_memory
    if sharded:
        if should:
            raise ValueError("probe_memory=True: the memory probe does not run on a model sharded with fully_shard "
                             "yet; leave probe_memory unset (an out-of-memory micro-batch halves the cap), or set "
                             "max_micro_batch_size")
        return cap, smallest, None
    if should is None:
        should = device.type != "cpu" or cfg.memory.memory_budget is not None
    if not should:
        return cap, smallest, None
    spec: Any = optimizer if isinstance(optimizer, torch.optim.Optimizer) else functools.partial(
        build_optimizer, optimizer, lr=lr)
    probe = probe_memory(
        model, source, loss_fn, optimizer=spec, forward_loss=forward_loss, device=device,
        budget_bytes=cfg.memory.memory_budget, max_micro_batch_size=max_batch_size,
        margin=cfg.memory.memory_margin, precision=precision,
    )
    found = probe.max_micro_batch_size
    return (min(found, cap) if cap is not None else found), probe.min_micro_batch_size, probe
