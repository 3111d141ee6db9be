"""One optimizer step's work in ``fit``: forward/backward over micro-batches (retried after an
out-of-memory error), gradient clipping and the optimizer update.

:func:`forward_backward` cuts this rank's share of the step into micro-batches no larger than
the memory cap, weights each mean loss by its loss items over the step's
(:func:`autobatch.accumulate.accumulate_gradients`, the one implementation of that weighting:
the accumulated gradient is exactly the step's mean-loss gradient, tokens included), and
lets the norm meter see each backward. An out-of-memory error in any micro-batch on any rank
halves the micro-batch cap on every rank and the same step is run again from scratch
(:func:`autobatch.memory.oom.retry_after_oom`): the global batch, and so the optimisation,
stay the same. Ranks agree on the outcome before any gradient collective, so an OOM on one
rank never leaves another waiting in one. Under DDP no micro-batch syncs gradients
(``no_sync``); the loop syncs them once, explicitly, after this. Under FSDP2 the model's own
reduce-scatters run in backward (:mod:`autobatch.train.sharded`): every rank runs the same
number of passes, zero-weight ones where its share is smaller.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autobatch.accumulate import Accumulated, accumulate_gradients, count_step_items
from autobatch.batch import ForwardLoss, LossFn, forward_and_loss
from autobatch.data import move_to
from autobatch.devices import autocast
from autobatch.memory.oom import MemoryBudget, release_after_oom, retry_after_oom
from autobatch.noise.micro_batch import StepGradNorms
from autobatch.noise.per_example import UnsupportedForPerExample
from autobatch.train.controller import BatchSizeController
from autobatch.train.data_loader import MicroBatchLoader
from autobatch.train.distributed import DistInfo, agree_max, sum_int
from autobatch.train.sharded import ShardedLayout, clip_sharded_gradients, set_gradient_sync
from autobatch.train.step_norms import StepNormMeter

__all__ = ["MicroBatchRun", "StepWork", "clip_gradients", "forward_backward", "optimizer_step"]


@dataclass(frozen=True)
class MicroBatchRun:
    """How a micro-batch becomes gradients, fixed for the run (plain values).

    Attributes:
        model: what the forward calls: the model, or its DDP wrapper under torchrun.
        loader: collates micro-batches from indices.
        loss_fn, forward_loss: the batch protocol's loss (:mod:`autobatch.batch`).
        loss_items: ``fit``'s ``loss_items`` resolved for the data (:mod:`autobatch.accumulate`).
        device: where training runs.
        move: whether batches must be moved to ``device`` (False when the data set's tensors
            already sit there).
        amp_dtype, scaler: autocast dtype and fp16 GradScaler (None for fp32).
        info: this process's rank and world size.
        memory_budget: bytes a step may hold, enforced by counting on CPU (None: the device's
            own limit).
        sharded: the FSDP2 layout of a model sharded with ``fully_shard``, or None.
    """

    model: nn.Module
    loader: MicroBatchLoader
    loss_fn: LossFn | None
    forward_loss: ForwardLoss | None
    loss_items: Any
    device: torch.device
    move: bool
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    info: DistInfo
    memory_budget: int | None = None
    sharded: ShardedLayout | None = None


@dataclass
class StepWork:
    """What the forward/backward passes of a step left, besides the gradients in ``.grad``.

    Attributes:
        acc: the accumulation's :class:`~autobatch.accumulate.Accumulated` (this rank's).
        sizes: this rank's micro-batch sizes (examples) in the attempt that succeeded.
        started: ``time.perf_counter()`` at the start of that attempt, so the step time
            leaves out attempts that ran out of memory.
        oom_retries: attempts that ran out of memory before it.
        items: the step's loss items over all ranks (its examples with ``loss_items="examples"``).
    """

    acc: Accumulated
    sizes: list[int]
    started: float
    oom_retries: int
    items: int


def forward_backward(run: MicroBatchRun, indices: torch.Tensor, global_batch: int, step: int, *,
                     meter: StepNormMeter, controller: BatchSizeController, optimizer: torch.optim.Optimizer,
                     before_retry: Callable[[], None] | None = None) -> StepWork:
    """Run forward/backward over this rank's ``indices``, retrying the step after an OOM.

    Per-example norms that prove unsupported on the first measured step
    (:class:`~autobatch.noise.per_example.UnsupportedForPerExample`) switch the meter to
    micro-batch norms with a one-line warning, and the step is run again.

    Args:
        run: the run's fixed pieces.
        indices: this rank's share of the step's examples.
        global_batch: ``B``, examples in the step over all ranks.
        step: the step's number (from 1).
        meter: sees every backward (its hooks), and decides the split of measured steps.
        controller: the micro-batch cap (:meth:`~BatchSizeController.micro_sizes`), lowered
            after an OOM.
        optimizer: its gradients are cleared before each attempt.
        before_retry: called before the step is run again after an OOM (``fit`` puts the
            buffers, e.g. BatchNorm statistics, back as they were before the step).

    Raises:
        ValueError: a step with no loss item on any rank (every target -100).
    """
    state: dict[str, Any] = {}

    def attempt() -> Accumulated:
        state["started"] = time.perf_counter()
        # Under FSDP every rank runs the micro-batch count of the largest share (its collectives
        # must match the others'); shares differ by at most one example.
        parts = len(controller.micro_sizes(-(-global_batch // run.info.world_size), 1)) if run.sharded else 1
        sizes = state["sizes"] = meter.split(step, indices.shape[0], controller.micro_sizes, parts)
        batches: Any = run.loader.micro_batches(indices, sizes)
        counts, total = None, global_batch
        if run.loss_items != "examples":
            # Items are counted before the first backward (the weights need the total), so the
            # micro-batches are collated up front; the total over ranks does not depend on the
            # split, and every rank reaches this collective before any can run out of memory.
            batches = list(batches)
            counts, total = count_step_items(
                batches, run.loss_items, model=run.model, loss_fn=run.loss_fn, forward_loss=run.forward_loss,
                all_reduce_items=(lambda n: sum_int(n, run.info, run.device)) if run.info.enabled else None)
        state["items"] = total
        try:
            with _memory_guard(run, optimizer):
                return _accumulate(run, batches, counts, total, meter, sizes, optimizer, parts, indices)
        except UnsupportedForPerExample as err:
            warnings.warn(f"gns_method='per_example' is not supported for this model ({err}); "
                          "measuring with micro-batch norms instead", stacklevel=6)  # the fit caller's line
            meter.fall_back_to_micro()
        return attempt()  # split again: a step measured with micro-batch norms may be cut in two

    def on_oom(size: int) -> None:
        release_after_oom(run.model, optimizer, run.device)
        if before_retry is not None:
            before_retry()
        controller.on_oom(size)

    acc, retries = retry_after_oom(
        attempt, failed_size=lambda: max(state["sizes"]), on_oom=on_oom,
        # every rank learns the largest failed micro-batch before any gradient collective
        agree=(lambda size: int(agree_max(size, run.info, run.device))) if run.info.enabled else None)
    return StepWork(acc, state["sizes"], state["started"], retries, state["items"])


def _accumulate(run: MicroBatchRun, batches: Any, counts: list[int] | None, total: int, meter: StepNormMeter,
                sizes: list[int], optimizer: torch.optim.Optimizer, parts: int, indices: torch.Tensor) -> Accumulated:
    optimizer.zero_grad(set_to_none=True)
    meter.begin_step(sizes)
    scaler, sharded = run.scaler, run.sharded
    passes = [0]

    def backward(loss: torch.Tensor) -> None:
        if sharded is not None and sharded.reduce == "step":  # reduce-scatter after the last pass only
            set_gradient_sync(sharded, passes[0] == parts - 1)
        passes[0] += 1
        (scaler.scale(loss) if scaler is not None else loss).backward()

    counts = sizes if counts is None else counts  # loss_items="examples": the items are the sizes
    device = run.device if run.move else None
    # the meter sees the micro-batches of a measured step only (a small step's overhead counts)
    after_backward = meter.after_micro_batch if meter.measuring else None
    if not run.info.enabled and scaler is None:  # one process: no context around the micro-batches
        return accumulate_gradients(run.model, batches, loss_fn=run.loss_fn, forward_loss=run.forward_loss,
                                    counts=counts, total_items=total, examples=sizes, device=device,
                                    amp_dtype=run.amp_dtype, after_backward=after_backward)
    step_args = {"counts": counts, "total_items": total, "examples": sizes, "device": device,
                 "amp_dtype": run.amp_dtype, "backward": backward, "after_backward": after_backward}
    if not run.info.enabled:
        return accumulate_gradients(run.model, batches, loss_fn=run.loss_fn, forward_loss=run.forward_loss, **step_args)
    if sharded is None:  # DDP: no micro-batch syncs; the loop sums the gradients once, after all of them
        with run.model.no_sync():
            return accumulate_gradients(run.model, batches, loss_fn=run.loss_fn, forward_loss=run.forward_loss,
                                        **step_args)
    acc = accumulate_gradients(run.model, batches, loss_fn=run.loss_fn, forward_loss=run.forward_loss,
                               loss_scale=sharded.data_parallel, **step_args)
    while passes[0] < parts:
        # This rank's share had fewer (non-empty) micro-batches than the largest: a pass of
        # weight zero runs the same all-gathers and reduce-scatters as the others' and adds
        # nothing (a BatchNorm layer would see its batch, though).
        pad = next(iter(run.loader.micro_batches(indices[:1], [1])))  # an example of the step, once more
        with autocast(run.device, run.amp_dtype):
            loss = forward_and_loss(run.model, move_to(pad, run.device) if run.move else pad, run.loss_fn,
                                    run.forward_loss)[0]
        backward(loss.float() * 0.0)
        meter.discard_pass()
    return acc


def _memory_guard(run: MicroBatchRun, optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """Raise an out-of-memory error when a step holds more than the budget (CPU only:
    accelerators enforce their own limit)."""
    if run.memory_budget is None:
        return contextlib.nullcontext()
    return MemoryBudget(run.memory_budget, baseline=(run.model, optimizer))


def clip_gradients(params: list[nn.Parameter], max_norm: float | None, norms: StepGradNorms | None,
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   sharded: ShardedLayout | None = None) -> None:
    """Clip the step's gradient to ``max_norm`` (if set), after the norms were measured and
    before the optimizer step. The norm is the one the meter read (unscaled, over ranks and
    shards): no second pass over the gradients. Under fp16 the factor applies to the scaled
    gradients, which ``scaler.step`` unscales."""
    if max_norm is None:
        return
    if sharded is not None:
        if norms is not None and math.isfinite(norms.big_sq_norm):
            clip_sharded_gradients(params, max_norm, math.sqrt(norms.big_sq_norm))
        else:  # gns_method="off": torch's own clipping reduces the norm over the shards
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    if norms is not None and math.isfinite(norms.big_sq_norm):
        total = torch.tensor(math.sqrt(norms.big_sq_norm))
    else:  # gns_method="off": no norm was read
        if scaler is not None:
            scaler.unscale_(optimizer)
        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``optimizer.step()``, through the fp16 GradScaler when there is one."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
