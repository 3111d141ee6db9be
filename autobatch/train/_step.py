"""The forward/backward passes of one optimizer step, retried from scratch after an OOM.

An out-of-memory error in any micro-batch on any rank halves the micro-batch cap on every
rank (:meth:`~autobatch.train.controller.BatchSizeController.on_oom`) and the same step is run
again with smaller micro-batches: the global batch, and so the optimisation, stay the same.
Ranks agree on the outcome (:func:`~autobatch.train.distributed.agree_max`) before any of
them enters the gradient all-reduce, so an OOM on one rank never leaves another waiting in a
collective.

Micro-batch losses are weighted in loss units (:mod:`autobatch.accumulate`): with
``loss_items="examples"`` a micro-batch of ``b_i`` examples weighs ``b_i / B``; with token
(or user-counted) items it weighs ``n_i / N``, ``N`` the step's items summed over ranks, so
the accumulated gradient is the gradient of the whole step's token mean whatever the padding.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autobatch.accumulate import _to_ints, count_loss_items
from autobatch.batch import ForwardLoss, LossFn, forward_and_loss
from autobatch.data import move_to
from autobatch.memory.oom import is_oom_error, release_after_oom
from autobatch.noise.per_example import UnsupportedForPerExample
from autobatch.train.distributed import agree_max, sum_int

if TYPE_CHECKING:
    from autobatch.train._setup import Setup

__all__ = ["Accumulated", "forward_backward", "micro_batch_loss"]


def micro_batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None, device: torch.device,
                     amp_dtype: torch.dtype | None, forward_loss: ForwardLoss | None = None, *,
                     move: bool = True) -> torch.Tensor:
    """The mean loss of one micro-batch, by the batch protocol (:func:`autobatch.batch.forward_and_loss`).

    Args:
        model: the module to call (possibly a DDP wrapper).
        batch: one micro-batch as collated by the data source (moved to ``device`` here).
        loss_fn, forward_loss: the batch protocol's loss (:mod:`autobatch.batch`); the loss
            is mean-reduced over the micro-batch's loss items.
        device: where the batch goes.
        amp_dtype: the autocast dtype, or None for full precision.
        move: False when the batch is known to be on ``device`` already.

    Raises:
        ValueError: if the loss is not a scalar tensor.
    """
    if move:
        batch = move_to(batch, device)
    if amp_dtype is None:  # even a disabled autocast context costs ~5% of a small CPU step
        return forward_and_loss(model, batch, loss_fn, forward_loss)[0]
    with torch.autocast(device.type, dtype=amp_dtype):
        return forward_and_loss(model, batch, loss_fn, forward_loss)[0]


@dataclass
class Accumulated:
    """What the forward/backward passes of a step left, besides the gradients in ``.grad``.

    Attributes:
        loss_sum: this rank's loss summed over its loss items and divided by ``loss_unit``
            (so that one micro-batch needs no tensor op: it is that micro-batch's mean loss), a
            detached 0-d tensor on the device, not read yet (no host sync). None if the rank
            had no example.
        sizes: this rank's micro-batch sizes (examples) in the attempt that succeeded.
        started: ``time.perf_counter()`` at the start of that attempt, so the step time
            leaves out attempts that ran out of memory.
        oom_retries: attempts that ran out of memory before it.
        loss_unit: the loss items of the first micro-batch that had any.
        total_items: the step's loss items over all ranks (``B`` for ``loss_items="examples"``).
    """

    loss_sum: torch.Tensor | None
    sizes: list[int]
    started: float
    oom_retries: int
    loss_unit: int | None = None
    total_items: int = 0


def forward_backward(s: Setup, indices: torch.Tensor, global_batch: int, step: int,
                     before_retry: Callable[[], None] | None = None) -> Accumulated:
    """Run forward/backward over this rank's ``indices``, retrying the step after an OOM.

    Each micro-batch's mean loss is weighted by ``items_i / total_items`` before its backward
    (module docstring), so the gradients summed over micro-batches (and ranks) are the step's
    mean-loss gradient. Per-example norms that prove unsupported on the first measured step
    (:class:`~autobatch.noise.per_example.UnsupportedForPerExample`) switch the meter to
    micro-batch norms with a one-line warning, and the step is run again.

    Args:
        s: the fit's setup (model, data, controller, meter...).
        indices: this rank's share of the step's examples.
        global_batch: ``B``, examples in the step over all ranks.
        step: optimizer steps done before this one.
        before_retry: called before the step is run again after an OOM (``fit`` puts the
            buffers, e.g. BatchNorm statistics, back as they were before the step).

    Raises:
        ValueError: a step with no loss item on any rank (every target -100).
    """
    retries = 0
    total = global_batch if s.loss_mode == "examples" else None
    while True:
        started = time.perf_counter()
        sizes = s.meter.split(step, indices.shape[0], s.controller.micro_sizes)
        batches, counts = s.loader.micro_batches(indices, sizes), None
        if s.loss_mode != "examples":
            # Items are counted before the first backward (the weights need the total), so the
            # micro-batches are collated up front; the total over ranks does not depend on the
            # split, and it is summed outside the OOM handling below, so that every rank
            # reaches this collective.
            batches = list(batches)
            counts = _to_ints([count_loss_items(b, s.loss_mode, model=s.model, loss_fn=s.loss_fn,
                                                forward_loss=s.forward_loss) for _, b in batches])
            if total is None:
                total = sum_int(sum(counts), s.info, s.device)
                if total <= 0:
                    raise ValueError(
                        f"step {step + 1} has no loss item (loss_items={s.loss_mode!r} counted 0): "
                        "every target is ignored (-100); check the labels, or pass "
                        "loss_items=f(batch) -> count"
                    )
        failed = 0
        try:
            with s.memory_guard():
                loss_sum, unit = _accumulate(s, batches, sizes, counts, total)
        except UnsupportedForPerExample as err:
            warnings.warn(f"gns_method='per_example' is not supported for this model ({err}); "
                          "measuring with micro-batch norms instead", stacklevel=4)
            s.meter.fall_back_to_micro()
            continue
        except Exception as err:
            if not is_oom_error(err):
                raise
            del err  # the traceback holds the failed attempt's tensors
            failed = max(sizes)
        failed = int(agree_max(failed, s.info, s.device))  # before any gradient collective
        if not failed:
            return Accumulated(loss_sum, sizes, started, retries, unit, total)
        release_after_oom(s.model, s.opt, s.device)
        if before_retry is not None:
            before_retry()
        s.controller.on_oom(failed)
        retries += 1


def _accumulate(s: Setup, batches: Any, sizes: list[int], counts: list[int] | None,
                total: int) -> tuple[torch.Tensor | None, int | None]:
    s.opt.zero_grad(set_to_none=True)
    s.meter.begin_step(sizes)
    loss_sum, unit = None, None
    # Under DDP no micro-batch syncs: the gradients are summed once, after all of them.
    with s.forward_model.no_sync() if s.info.enabled else contextlib.nullcontext():
        for i, (size, batch) in enumerate(batches):
            items = size if counts is None else counts[i]
            if items == 0:  # all its targets ignored: nothing in the mean, and a NaN mean loss
                continue
            loss = micro_batch_loss(s.forward_model, batch, s.loss_fn, s.device, s.amp_dtype,
                                    s.forward_loss, move=s.move_batches)
            weight = items / total
            if loss.dtype != torch.float32:
                loss = loss.float()
            scaled = loss * weight if weight != 1.0 else loss
            (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
            s.meter.after_backward(size, weight, items)
            if loss_sum is None:
                loss_sum, unit = loss.detach(), items
            else:
                loss_sum = loss_sum + loss.detach() * (items / unit)
    return loss_sum, unit
