"""Evaluation of a model on held-out data: mean loss, and accuracy where it means something.

Accuracy needs to know which target each prediction is for. ``accuracy="auto"`` scores:

- a Hugging Face causal LM on dict batches (:func:`autobatch.batch.shifts_labels`): the logits
  at position ``t`` against ``labels[t + 1]``, as its own loss does;
- targets that are a tensor of their own (``(x, y)``, a dict's ``labels`` other than its
  inputs): each prediction against the target at its own position;
- targets that are the inputs themselves (``(x, x)`` batches, ``labels`` equal to
  ``input_ids`` wherever not -100) with a loss of the user's: nothing, with a warning. The
  loss alone knows whether position ``t`` predicts token ``t`` or ``t + 1``; a guess would
  report 0.0 for a model that predicts every next token. ``accuracy="next_token"`` or
  ``"same_position"`` says which.

:func:`check_val_data` runs the first examples through the same code before training, so a
``val_data`` that cannot be evaluated fails then, not at the first evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from autobatch._state import preserved_state, train_modes
from autobatch.accumulate import IGNORE_INDEX, LossItems, count_loss_items
from autobatch.batch import (
    ForwardLoss,
    LossFn,
    forward_and_loss,
    output_logits,
    shifts_labels,
    target_of,
)
from autobatch.data import BatchSource, TensorDictDataset, as_batch_source, move_to
from autobatch.devices import autocast, canonical_device, model_device
from autobatch.memory.oom import is_oom_error, release_after_oom, retry_after_oom

__all__ = ["ACCURACY_MODES", "EVAL_BATCH_SIZE", "accuracy_errors", "check_val_data", "evaluate"]

ACCURACY_MODES = ("auto", "next_token", "same_position")
"""The values of ``accuracy`` besides False (no accuracy); see the module docstring."""

EVAL_BATCH_SIZE = 1024
"""Examples per forward pass of :func:`evaluate` when no memory cap is known."""


def accuracy_errors(accuracy: Any, forward_loss: ForwardLoss | None = None) -> list[str]:
    """What is wrong with an ``accuracy`` setting (nothing: an empty list), with the fix."""
    if accuracy is not False and (not isinstance(accuracy, str) or accuracy not in ACCURACY_MODES):
        return [f"accuracy must be 'auto', 'next_token', 'same_position' or False (got accuracy={accuracy!r}); "
                "'next_token' scores the logits at position t against target t + 1 (a language model on (x, x) "
                "batches), 'same_position' against target t, 'auto' decides when it can"]
    if accuracy in ("next_token", "same_position") and forward_loss is not None:
        return [f"accuracy={accuracy!r} needs the model's outputs, which forward_loss hides; pass accuracy='auto' "
                "(no accuracy with forward_loss), or compute it in eval_fn"]
    return []


def _targets_are_inputs(batch: Any, target: torch.Tensor) -> bool:
    """Whether ``target`` repeats one of the batch's inputs wherever it is not -100: a
    ``(x, x)`` batch, or ``labels`` that are the ``input_ids`` (padded with -100)."""
    if isinstance(batch, Mapping):
        inputs = [v for k, v in batch.items() if k != "labels"]
    else:
        inputs = list(batch[:-1])
    ignored = target == IGNORE_INDEX
    return any(isinstance(x, torch.Tensor) and x.shape == target.shape and not (x.is_floating_point()
               or x.is_complex()) and bool(((x == target) | ignored).all()) for x in inputs)


def _alignment(model: nn.Module, batch: Any, accuracy: str | bool) -> str | bool:
    """What ``accuracy`` means for batches like ``batch``: ``"next_token"``,
    ``"same_position"``, or False (no accuracy); ``"auto"`` decided as the module docstring
    says, once per evaluation (a small batch whose targets happen to equal its inputs does not
    decide for the others)."""
    if accuracy != "auto":
        return accuracy
    target = target_of(batch)
    if target is None or target.is_floating_point() or target.is_complex():
        return False
    if isinstance(batch, Mapping) and shifts_labels(model):
        return "next_token"
    if _targets_are_inputs(batch, target):
        warnings.warn(
            "val_accuracy is not reported: the targets are the inputs themselves ((x, x) batches, or labels equal "
            "to input_ids), so only the loss knows whether the logits at position t predict token t or t + 1; pass "
            "accuracy='next_token' (a language model) or accuracy='same_position'", UserWarning, stacklevel=5)
        return False
    return "same_position"


def _predictions(batch: Any, output: Any, mode: str, explicit: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits, targets)`` to score, aligned as ``mode`` says, or None where the output and
    targets are not class or token logits over integer targets: class logits ``(B, C)`` vs
    ``(B,)``, token logits ``(B, T, V)`` vs ``(B, T)``.

    Raises:
        ValueError: where they are not, for a mode the user gave (``explicit``).
    """
    logits, target = output_logits(output), target_of(batch)
    if logits is None or target is None or target.is_floating_point() or target.is_complex():
        if not explicit:
            return None
        got = "no logits in the model's output" if logits is None else (
            "no targets" if target is None else f"{str(target.dtype).removeprefix('torch.')} targets")
        raise ValueError(f"accuracy={mode!r} needs integer targets (class or token indices) and logits in the "
                         f"model's output (got {got}); pass accuracy=False for targets that are not class indices")
    shapes = f"got logits of shape {tuple(logits.shape)} and targets of shape {tuple(target.shape)}"
    if mode == "next_token":
        if logits.ndim < 3 or logits.ndim != target.ndim + 1:
            if not explicit:
                return None
            raise ValueError(
                f"accuracy='next_token' needs token logits (B, T, V) and targets (B, T), the logits at position t "
                f"scored against target t + 1 ({shapes}); pass accuracy='same_position' for class logits, or "
                "accuracy=False")
        logits, target = logits[..., :-1, :], target[..., 1:]
    if logits.ndim != target.ndim + 1 or logits.shape[:-1] != target.shape:
        if not explicit:
            return None
        raise ValueError(f"accuracy={mode!r} needs logits with one more (class) dimension than the targets, (B, C) "
                         f"against (B,) or (B, T, V) against (B, T) ({shapes}); pass accuracy=False")
    return logits, target


def _forward(model: nn.Module, batch: Any, loss_fn: LossFn | None, forward_loss: ForwardLoss | None,
             loss_items: LossItems, device: torch.device, amp_dtype: torch.dtype | None) -> tuple[int, Any, Any, Any]:
    """``(loss items, loss, output, batch on the device)`` of one batch; no forward (loss and
    output None) for a batch without a loss item."""
    items = int(count_loss_items(batch, loss_items, model=model, loss_fn=loss_fn, forward_loss=forward_loss))
    if items == 0:
        return 0, None, None, batch
    batch = move_to(batch, device)
    with autocast(device, amp_dtype):
        loss, output = forward_and_loss(model, batch, loss_fn, forward_loss)
    return items, loss, output, batch


def _order(source: BatchSource) -> torch.Tensor:
    """The examples an evaluation scores, in order: one epoch of a DataLoader's sampler, or all."""
    return source.sampler_order(0) if source.sampler is not None else torch.arange(len(source))


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
    accuracy: str | bool = "auto",
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
        accuracy: ``"auto"``, ``"next_token"``, ``"same_position"`` or False: which target
            each prediction is scored against (module docstring).
        agree: under FSDP, the largest batch size that ran out of memory over all processes
            (0 where none did), so that every process halves together and their forwards'
            collectives match (:func:`autobatch.memory.oom.retry_after_oom`).

    Returns:
        ``{"val_loss": ...}``, plus ``"val_accuracy"`` (a fraction in [0, 1]) when every batch
        has integer targets and logits with one more (class) dimension, aligned as
        ``accuracy`` says: class logits ``(B, C)`` vs ``(B,)``, token logits ``(B, T, V)`` vs
        ``(B, T)`` compared per token. Targets equal to -100 (``ignore_index``) are not
        counted. Logits are the output itself, its ``.logits``, or the first element of a
        tuple output; targets are a tuple batch's last element or a dict batch's ``"labels"``.
        No accuracy with ``forward_loss``.

    Raises:
        ValueError: ``batch_size < 1``, a bad ``accuracy`` or one the outputs cannot have, or
            the data has no loss item at all.
        RuntimeError: a single example runs out of memory.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got batch_size={batch_size})")
    if errors := accuracy_errors(accuracy, forward_loss):
        raise ValueError(errors[0])
    source = as_batch_source(data, name="val_data", check_items=forward_loss is None)
    device = canonical_device(device) if device is not None else model_device(model)
    order = _order(source)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    items_total = correct = scored = 0
    classify = forward_loss is None and accuracy is not False
    mode: str | bool | None = None  # decided on the first batch with a loss item
    start, size = 0, batch_size

    def attempt() -> tuple[int, int, Any, tuple[int, int] | None]:
        nonlocal mode
        chunk = order[start:start + size]
        items, loss, output, batch = _forward(model, source.batch(chunk), loss_fn, forward_loss, loss_items, device,
                                              amp_dtype)
        if not (classify and items):
            return len(chunk), items, loss, None
        if mode is None:
            mode = _alignment(model, batch, accuracy)
        pair = _predictions(batch, output, mode, explicit=accuracy != "auto") if mode else None
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


def _class_index_outside(source: BatchSource, classes: int) -> tuple[int, int] | None:
    """``(example, target)``: the first in-memory integer target outside ``[0, classes)`` and
    not -100, or None (there is none, or the targets are not held as one tensor)."""
    ds = source.dataset
    target = ds.tensors.get("labels") if isinstance(ds, TensorDictDataset) else (
        ds.tensors[-1] if isinstance(ds, TensorDataset) else None)
    if source.sampler is not None or not isinstance(target, torch.Tensor) or target.ndim == 0 \
            or target.is_floating_point() or target.is_complex():
        return None
    bad = ((target != IGNORE_INDEX) & ((target < 0) | (target >= classes))).reshape(len(target), -1)
    rows = bad.any(1).nonzero()
    if not len(rows):
        return None
    i = int(rows[0])
    return i, int(target[i].reshape(-1)[bad[i]][0])


def _cannot_evaluate(err: Exception, what: str, loss_name: str, model: nn.Module, batch: Any) -> ValueError:
    """The error for a ``val_data`` the model or loss fails on: the error, a likely cause, the fix."""
    tensors = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    other = sorted({str(t.dtype).removeprefix("torch.") for t in tensors
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != own})
    hint = (f" (val_data holds {' and '.join(other)} tensors where the model's parameters are "
            f"{str(own).removeprefix('torch.')}: convert them, e.g. X_val.to({own}))") if own is not None and other else ""
    other_form = "" if loss_name in ("val_loss_fn", "forward_loss") else (
        ", or pass val_loss_fn=f(output, target) -> scalar if its targets have another form (e.g. hard labels "
        "where training uses soft ones)")
    return ValueError(f"val_data cannot be evaluated: {what} through the model and {loss_name} raised "
                      f"{type(err).__name__}: {err}{hint}. Every evaluation runs val_data through them, as training "
                      f"runs data: give it the form, dtypes and targets of data{other_form}")


def check_val_data(
    model: nn.Module,
    source: BatchSource,
    loss_fn: LossFn | None = None,
    *,
    forward_loss: ForwardLoss | None = None,
    loss_items: LossItems = "auto",
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    accuracy: str | bool = "auto",
    loss_name: str = "loss_fn",
) -> None:
    """Evaluate ``source``'s first 2 examples as :func:`evaluate` would, before training, so a
    ``val_data`` the model or loss cannot read fails now, not after an epoch.

    Also run: the first example whose in-memory class index the logits cannot score (outside
    ``[0, C)`` and not -100), if any, so a bad label anywhere is caught (a loss that maps
    labels itself passes). The model is left as it was (:func:`autobatch._state.preserved_state`:
    modes, RNGs, buffers, gradients).

    Args:
        model, source, loss_fn, forward_loss, loss_items, device, amp_dtype, accuracy: as
            the evaluations will get them.
        loss_name: what ``loss_fn`` is called in messages (``"val_loss_fn"``, ``"loss_fn"``).

    Raises:
        ValueError: naming ``val_data``, the example(s), the error, a likely cause and the fix;
            or an ``accuracy`` the outputs cannot have.
    """
    if forward_loss is not None:
        loss_name = "forward_loss"
    elif loss_fn is None:
        loss_name = "the model's own .loss"
    first = _order(source)[:2]

    def run(indices: torch.Tensor, what: str) -> tuple[Any, Any]:
        batch = source.batch(indices)
        try:
            _, loss, output, batch = _forward(model, batch, loss_fn, forward_loss, loss_items, device, amp_dtype)
            if loss is not None:
                float(loss)  # a device-side error (a CUDA index assert) surfaces here, not later
        except Exception as err:
            if is_oom_error(err):
                raise
            raise _cannot_evaluate(err, what, loss_name, model, batch) from err
        return output, batch

    with preserved_state(model, train=False), torch.no_grad():
        output, batch = run(first, f"its first {len(first)} example{'s' if len(first) > 1 else ''}")
        if output is None:
            return
        if accuracy in ACCURACY_MODES[1:]:  # an alignment the outputs cannot have fails now
            _predictions(batch, output, accuracy, explicit=True)
        logits, target = output_logits(output), target_of(batch)
        if logits is not None and target is not None and logits.ndim == target.ndim + 1:
            bad = _class_index_outside(source, logits.shape[-1])
            if bad is not None:
                i, value = bad
                run(torch.tensor([i]), f"example {i} (target {value}, outside the {logits.shape[-1]} classes the "
                                       "model's logits score)")
