"""The forward/backward passes of one optimizer step, retried from scratch after an OOM.

An out-of-memory error in any micro-batch on any rank halves the micro-batch cap on every
rank (:meth:`~autobatch.train.controller.BatchSizeController.on_oom`) and the same step is run
again with smaller micro-batches: the global batch, and so the optimisation, stay the same.
Ranks agree on the outcome (:func:`~autobatch.train.distributed.agree_max`) before any of
them enters the gradient all-reduce, so an OOM on one rank never leaves another waiting in a
collective.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autobatch.data import move_to
from autobatch.memory.oom import is_oom_error, release_after_oom
from autobatch.train.distributed import agree_max

if TYPE_CHECKING:
    from autobatch.train._setup import Setup

__all__ = ["Accumulated", "forward_backward", "micro_batch_loss"]


def micro_batch_loss(model: nn.Module, batch: Any, loss_fn: Any, device: torch.device,
                     amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The mean loss of one micro-batch: the one place where a batch meets the model.

    Args:
        model: the module to call (possibly a DDP wrapper).
        batch: an ``(inputs, targets)`` pair as collated by the data source.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> a scalar, mean-reduced over the batch.
        device: where the batch goes.
        amp_dtype: the autocast dtype, or None for full precision.

    Raises:
        ValueError: if ``loss_fn`` returns anything but a scalar tensor.
    """
    inputs, targets = move_to(batch, device)
    if amp_dtype is None:  # even a disabled autocast context costs ~5% of a small CPU step
        loss = loss_fn(model(inputs), targets)
    else:
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor (got {shape}); reduce it with .mean() "
            "(mean-reduced losses are what the LR rules and the noise scale assume)"
        )
    return loss


@dataclass
class Accumulated:
    """What the forward/backward passes of a step left, besides the gradients in ``.grad``.

    Attributes:
        loss_sum: this rank's loss summed over its examples and divided by ``sizes[0]`` (so
            that one micro-batch needs no tensor op: it is that micro-batch's mean loss), a
            detached 0-d tensor on the device, not read yet (no host sync). None if the rank
            had no example.
        sizes: this rank's micro-batch sizes in the attempt that succeeded.
        started: ``time.perf_counter()`` at the start of that attempt, so the step time
            leaves out attempts that ran out of memory.
        oom_retries: attempts that ran out of memory before it.
    """

    loss_sum: torch.Tensor | None
    sizes: list[int]
    started: float
    oom_retries: int


def forward_backward(s: Setup, indices: torch.Tensor, global_batch: int, step: int) -> Accumulated:
    """Run forward/backward over this rank's ``indices``, retrying the step after an OOM.

    Each micro-batch's mean loss is weighted by ``b_i / global_batch`` before its backward,
    so the gradients summed over micro-batches (and ranks) are the step's mean gradient.

    Args:
        s: the fit's setup (model, data, controller, meter...).
        indices: this rank's share of the step's examples.
        global_batch: ``B``, examples in the step over all ranks.
        step: optimizer steps done before this one.
    """
    retries = 0
    while True:
        started = time.perf_counter()
        sizes = s.meter.split(step, len(indices), s.controller.micro_sizes)
        failed = 0
        try:
            with s.memory_guard():
                loss_sum = _accumulate(s, indices, sizes, global_batch)
        except Exception as err:
            if not is_oom_error(err):
                raise
            del err  # the traceback holds the failed attempt's tensors
            failed = max(sizes)
        failed = int(agree_max(failed, s.info, s.device))  # before any gradient collective
        if not failed:
            return Accumulated(loss_sum, sizes, started, retries)
        release_after_oom(s.model, s.opt, s.device)
        s.controller.on_oom(failed)
        retries += 1


def _accumulate(s: Setup, indices: torch.Tensor, sizes: list[int], global_batch: int) -> torch.Tensor | None:
    s.opt.zero_grad(set_to_none=True)
    s.meter.begin_step(sizes)
    loss_sum = None
    # Under DDP no micro-batch syncs: the gradients are summed once, after all of them.
    with s.forward_model.no_sync() if s.info.enabled else contextlib.nullcontext():
        for size, batch in s.loader.micro_batches(indices, sizes):
            loss = micro_batch_loss(s.forward_model, batch, s.loss_fn, s.device, s.amp_dtype)
            weight = size / global_batch
            scaled = loss.float() * weight if weight != 1.0 else loss.float()
            (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
            s.meter.after_backward(size, weight)
            if loss_sum is None:
                loss_sum = loss.detach().float()
            else:
                loss_sum = loss_sum + loss.detach().float() * (size / sizes[0])
    return loss_sum
