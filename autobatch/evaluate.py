"""Evaluation of a model on held-out data: mean loss, and accuracy where it means something."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from autobatch._state import train_modes
from autobatch.accumulate import IGNORE_INDEX, LossItems, count_loss_items
from autobatch.batch import (
    ForwardLoss,
    LossFn,
    forward_and_loss,
    output_logits,
    shifts_labels,
    target_of,
)
from autobatch.data import as_batch_source, move_to
from autobatch.devices import autocast, canonical_device, model_device
from autobatch.memory.oom import release_after_oom, retry_after_oom

__all__ = ["EVAL_BATCH_SIZE", "evaluate"]

EVAL_BATCH_SIZE = 1024
"""Examples per forward pass of :func:`evaluate` when no memory cap is known."""


def _predictions(model: nn.Module, batch: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits, targets)`` to score, or None where accuracy is not meaningful.

    Meaningful: integer targets and logits with one more (class) dimension and the same
    leading shape: class logits ``(B, C)`` vs ``(B,)``, token logits ``(B, T, V)`` vs
    ``(B, T)``. A Hugging Face causal LM's logits at position ``t`` predict ``labels[t + 1]``.
    """
    logits, target = output_logits(output), target_of(batch)
    if logits is None or target is None or target.is_floating_point() or target.is_complex():
        return None
    if isinstance(batch, Mapping) and shifts_labels(model) and logits.ndim >= 3:
        logits, target = logits[..., :-1, :], target[..., 1:]
    if logits.ndim != target.ndim + 1 or logits.shape[:-1] != target.shape:
        return None
    return logits, target


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    loss_fn: LossFn | None = None,
    *,
    forward_loss: ForwardLoss | None = None,
    loss_items: LossItems = "auto",
    device: torch.device | str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    amp_dtype: torch.dtype | None = None,
    agree: Callable[[int], int] | None = None,
) -> dict[str, float]:
    """Mean loss (and accuracy where meaningful) of ``model`` over ``data``, in eval mode.

    Batches follow the batch protocol of training (:mod:`autobatch.batch`), so ``loss_fn``
    is optional for dict batches (the output's ``.loss``, e.g. a Hugging Face model given
    ``labels``). A DataLoader's own sampler, if it has one, gives the order and the examples
    scored (one epoch of it).

    Args:
        model: the model; its train/eval flags are restored afterwards.
        data: any form of :func:`autobatch.data.as_batch_source`.
        loss_fn, forward_loss: the batch protocol's loss, mean-reduced per batch.
        loss_items: what each batch's mean is over (:mod:`autobatch.accumulate`): batches
            are weighted by it, so ``val_loss`` is the mean over all loss items (all
            non-ignored tokens of an LM), whatever the batching.
        device: where batches go; None: the device of the model's first parameter.
        batch_size: examples per forward pass (memory only; the result does not depend on
            it). ``fit`` passes its micro-batch cap. A batch that runs out of memory is
            halved and run again, and the smaller size kept for the rest.
        amp_dtype: autocast dtype for the forward and loss (None: none).
        agree: under FSDP, the largest batch size that ran out of memory over all processes
            (0 where none did), so that every process halves together and their forwards'
            collectives match (:func:`autobatch.memory.oom.retry_after_oom`).

    Returns:
        ``{"val_loss": ...}``, plus ``"val_accuracy"`` (a fraction in [0, 1]) when every batch
        has integer targets and logits with one more (class) dimension: class logits ``(B, C)``
        vs ``(B,)``, token logits ``(B, T, V)`` vs ``(B, T)`` compared per token. Targets equal
        to -100 (``ignore_index``) are not counted; a Hugging Face causal LM's logits are
        compared with the next token. Logits are the output itself, its ``.logits``, or the
        first element of a tuple output; targets are a tuple batch's last element or a dict
        batch's ``"labels"``. No accuracy with ``forward_loss``.

    Raises:
        ValueError: ``batch_size < 1``, or the data has no loss item at all.
        RuntimeError: a single example runs out of memory.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got batch_size={batch_size})")
    source = as_batch_source(data, name="val_data", check_items=forward_loss is None)
    device = canonical_device(device) if device is not None else model_device(model)
    order = source.sampler_order(0) if source.sampler is not None else torch.arange(len(source))
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    items_total = correct = scored = 0
    classify = forward_loss is None
    start, size = 0, batch_size

    def attempt() -> tuple[int, int, Any, tuple[int, int] | None]:
        chunk = order[start:start + size]
        batch = source.batch(chunk)
        items = int(count_loss_items(batch, loss_items, model=model, loss_fn=loss_fn, forward_loss=forward_loss))
        if items == 0:
            return len(chunk), 0, None, None
        batch = move_to(batch, device)
        with autocast(device, amp_dtype):
            loss, output = forward_and_loss(model, batch, loss_fn, forward_loss)
        pair = _predictions(model, batch, output) if classify else None
        if pair is None:
            return len(chunk), items, loss, None
        logits, target = pair
        keep = target != IGNORE_INDEX
        return len(chunk), items, loss, (int(((logits.argmax(-1) == target) & keep).sum()), int(keep.sum()))

    def halve(failed: int) -> None:
        nonlocal size
        if failed <= 1:
            raise RuntimeError("evaluation ran out of memory on a single example; the model does not fit this "
                               "device for inference: free memory, use a smaller model, or lower precision")
        release_after_oom(model, device=device, keep_grads=True)
        size = failed // 2

    def failed_size() -> int:
        return min(size, len(order) - start)

    with train_modes(model, train=False):
        while start < len(order):
            (taken, items, loss, hits), _ = retry_after_oom(attempt, failed_size=failed_size, on_oom=halve, agree=agree)
            start += taken
            if items == 0:
                continue
            loss_total += loss.double() * items
            items_total += items
            classify = classify and hits is not None
            if classify:
                correct += hits[0]
                scored += hits[1]
    if items_total == 0:
        raise ValueError("val_data has no loss item (every target is -100?); nothing to evaluate")
    metrics = {"val_loss": float(loss_total) / items_total}
    if classify and scored:
        metrics["val_accuracy"] = correct / scored
    return metrics
