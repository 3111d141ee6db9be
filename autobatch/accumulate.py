"""Gradient accumulation in loss units: micro-batches weighted so that the summed gradient is
exactly the gradient of the whole step's mean loss.

A step of ``B`` examples is run as micro-batches (memory, or the noise-scale measurement).
Each micro-batch loss is a mean over its own *loss items*: its examples for a per-example
loss, its non-ignored tokens for a token-mean language-model loss. Weighting micro-batch
``i`` by ``n_i / N`` (``n_i`` its items, ``N`` the step's) makes the accumulated gradient
``sum_i (n_i/N) grad(mean_i) = grad(sum of item losses / N)``, the step's mean-loss gradient,
whatever the padding. Weighting by examples instead is wrong for token means: micro-batches
with few real tokens would count as much as full ones (Hugging Face's ``num_items_in_batch``
fix addresses the same bug; here the weights carry it, so it works for every model, including
those that ignore ``num_items_in_batch``).

``loss_items`` (the same keyword in every entry point) says what a loss item is:

- ``"examples"``: ``n_i`` is the micro-batch's number of examples;
- ``"tokens"``: ``n_i`` is the number of targets that are not ``-100`` (PyTorch's
  ``ignore_index`` and Hugging Face's padding label): ``batch["labels"]`` of a dict batch
  (``batch["shift_labels"]`` if present), the last element of a tuple batch. For a Hugging
  Face causal LM whose loss is its own ``.loss``, ``labels[..., 1:]``, since it shifts them;
- ``"auto"`` (default): ``"tokens"`` when the loss is a Hugging Face-style ``.loss`` of a dict
  batch holding ``labels`` (a token mean for language models; one item per example for
  sequence classification), ``"examples"`` otherwise;
- a function ``batch -> count`` (an int or an integer tensor) for anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from autobatch._state import preserved_state
from autobatch.batch import ForwardLoss, LossFn, forward_and_loss, shifts_labels
from autobatch.data import BatchSource, batch_size_of, move_to
from autobatch.devices import autocast, canonical_device, model_device

__all__ = ["Accumulated", "LossItems", "MicroStep", "WeightedLoss", "accumulate_gradients", "check_mean_reduced",
           "count_loss_items", "count_step_items", "resolve_loss_items"]

LossItems = Literal["auto", "examples", "tokens"] | Callable[[Any], "int | torch.Tensor"]
_NAMES = ("auto", "examples", "tokens")
IGNORE_INDEX = -100


def resolve_loss_items(
    loss_items: LossItems, batch: Any, *, loss_fn: LossFn | None = None,
    forward_loss: ForwardLoss | None = None,
) -> Literal["examples", "tokens"] | Callable[[Any], Any]:
    """What ``"auto"`` means for this batch and loss (see the module docstring).

    Raises:
        ValueError: for an unknown name.
    """
    if callable(loss_items):
        return loss_items
    if loss_items not in _NAMES:
        raise ValueError(
            f"loss_items must be one of {_NAMES} or a function batch -> count (got "
            f"loss_items={loss_items!r})"
        )
    if loss_items != "auto":
        return loss_items
    own_loss = isinstance(batch, Mapping) and loss_fn is None and forward_loss is None
    return "tokens" if own_loss and ("labels" in batch or "shift_labels" in batch) else "examples"


def _token_targets(batch: Any, model: nn.Module | None, shifted_by_model: bool) -> torch.Tensor:
    if isinstance(batch, Mapping):
        if isinstance(batch.get("shift_labels"), torch.Tensor):
            return batch["shift_labels"]
        target = batch.get("labels")
        if not isinstance(target, torch.Tensor):
            raise ValueError(
                f"loss_items='tokens' counts batch['labels'] != -100, but this dict batch has no "
                f"'labels' tensor (keys {sorted(batch)}); pass loss_items=f(batch) -> count"
            )
        if shifted_by_model and model is not None and shifts_labels(model):
            return target[..., 1:]  # the model predicts labels[t + 1] at position t
        return target
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[-1], torch.Tensor):
        return batch[-1]
    raise ValueError(
        f"loss_items='tokens' counts the targets != -100 of a (inputs..., target) or dict batch "
        f"(got a {type(batch).__name__}); pass loss_items=f(batch) -> count"
    )


def count_loss_items(
    batch: Any, loss_items: LossItems = "auto", *, model: nn.Module | None = None,
    loss_fn: LossFn | None = None, forward_loss: ForwardLoss | None = None,
) -> int | torch.Tensor:
    """Loss items in one batch: what its mean-reduced loss divides by.

    Args:
        batch: one (micro-)batch.
        loss_items: see the module docstring.
        model: the model, to know whether it shifts labels (Hugging Face causal LMs).
        loss_fn, forward_loss: as given to the entry point (they decide what ``"auto"`` is,
            and labels are taken as shifted by the model only when the loss is its own).

    Returns:
        An ``int``, or a 0-d integer tensor on the batch's device (read it with the others
        in one host sync).

    Raises:
        ValueError: for an unknown ``loss_items``, ``"tokens"`` without integer targets, or a
            negative count.
    """
    mode = resolve_loss_items(loss_items, batch, loss_fn=loss_fn, forward_loss=forward_loss)
    if mode == "examples":
        return batch_size_of(batch)
    if mode == "tokens":
        own_loss = loss_fn is None and forward_loss is None
        target = _token_targets(batch, model, shifted_by_model=own_loss)
        if target.is_floating_point() or target.is_complex():
            raise ValueError(
                f"loss_items='tokens' needs integer targets with -100 marking ignored positions "
                f"(got {target.dtype} targets); pass loss_items=f(batch) -> count"
            )
        return (target != IGNORE_INDEX).sum()
    count = mode(batch)
    if isinstance(count, torch.Tensor):
        return count.reshape(())
    if int(count) != count or count < 0:
        raise ValueError(f"loss_items function must return a count >= 0 (got {count!r})")
    return int(count)


class MicroStep(NamedTuple):
    """One micro-batch after its backward, as :func:`accumulate_gradients` reports it (a named
    tuple: made once per micro-batch, on the step's hot path).

    Attributes:
        index: position in the step.
        batch: the micro-batch (on the device).
        examples: its examples.
        items: its loss items (``== examples`` for ``loss_items="examples"``).
        weight: the factor its mean loss was multiplied by before backward: ``items / total``
            (times ``loss_scale``, when :func:`accumulate_gradients` was given one).
    """

    index: int
    batch: Any
    examples: int
    items: int
    weight: float


@dataclass
class Accumulated:
    """What one accumulated step did (this process's share).

    Attributes:
        loss: ``sum_i weight_i x mean loss_i`` over this process's micro-batches, a detached
            float32 0-d tensor on the device (no host sync; None when no micro-batch had a
            loss item): the step's mean loss, or under data parallelism this process's part of
            it (summed over processes, it is the step's mean over all its loss items).
        total_items: the denominator every weight used (over all processes).
        items: loss items per micro-batch, in order (those with none were skipped).
        examples: examples per micro-batch, in order.
    """

    loss: torch.Tensor | None
    total_items: int
    items: list[int]
    examples: list[int]


WeightedLoss = Callable[[Any, float], torch.Tensor]
"""``weighted_loss(micro_batch, weight) -> loss``: the scalar whose backward a micro-batch runs,
its mean loss already multiplied by ``weight`` (e.g. a Hugging Face loss given
``num_items_in_batch``, a sum over the micro-batch's tokens divided by the step's)."""


def count_step_items(
    micro_batches: Sequence[Any], loss_items: LossItems = "auto", *, model: nn.Module | None = None,
    loss_fn: LossFn | None = None, forward_loss: ForwardLoss | None = None,
    all_reduce_items: Callable[[int], int] | None = None,
) -> tuple[list[int], int]:
    """The loss items of each micro-batch of a step (one host sync for all), and the step's
    total over processes: what :func:`accumulate_gradients` weighs them by.

    Args:
        micro_batches: the step's (collated) micro-batches on this process.
        loss_items, model, loss_fn, forward_loss: as in :func:`count_loss_items`.
        all_reduce_items: sums a count over processes (data parallelism); None for one process.

    Raises:
        ValueError: as :func:`count_loss_items`, or for a step with no loss item at all.
    """
    counts = _to_ints([count_loss_items(b, loss_items, model=model, loss_fn=loss_fn, forward_loss=forward_loss)
                       for b in micro_batches])
    local = sum(counts)
    total = all_reduce_items(local) if all_reduce_items is not None else local
    if total <= 0:
        raise ValueError(
            f"this step has no loss item (loss_items={loss_items!r} counted {total}): every "
            "target is ignored (-100); check the labels, or pass loss_items=f(batch) -> count"
        )
    return counts, total


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    forward_loss: ForwardLoss | None = None,
    loss_items: LossItems = "auto",
    step_examples: int | None = None,
    all_reduce_items: Callable[[int], int] | None = None,
    counts: Sequence[int] | None = None,
    total_items: int | None = None,
    examples: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    weighted_loss: WeightedLoss | None = None,
    loss_scale: float = 1.0,
    backward: Callable[[torch.Tensor], None] | None = None,
    after_backward: Callable[[MicroStep], None] | None = None,
) -> Accumulated:
    """Forward and backward every micro-batch of one step, each loss weighted by
    ``items_i / total_items``, so that ``.grad`` gains the gradient of the step's mean loss.

    The one implementation of this weighting: ``autobatch.fit``, :func:`~autobatch.noise.measure.measure_noise_scale`
    and the Hugging Face integration all call it, and a custom loop can too.
    Gradients are added to ``.grad`` (zero them before, step the optimizer after). Micro-
    batches with no loss item (all targets ignored) are skipped: they contribute nothing to
    the mean, and a mean over zero items would be NaN.

    Args:
        model: the module (or DDP wrapper; enter ``no_sync()`` around the call yourself).
        micro_batches: the step's micro-batches, e.g. collated from index chunks by
            :meth:`autobatch.data.BatchSource.batch` (so a collate_fn pads each one).
        loss_fn, forward_loss: the batch protocol (:func:`autobatch.batch.forward_and_loss`).
        loss_items: what a loss item is (module docstring).
        step_examples: examples in the whole step over all processes. With
            ``loss_items="examples"`` it lets micro-batches stream (each is collated, run and
            freed in turn); otherwise, and when it is None, the micro-batches are all
            collated first, to count the items before the first backward.
        all_reduce_items: sums an item count over processes (data parallelism: an
            all-reduce); None for one process.
        counts, total_items: the micro-batches' loss items and the step's total over
            processes, when counted already (:func:`count_step_items`, e.g. outside a block
            that retries after an out-of-memory error, so that every process reaches the
            count's all-reduce; for ``loss_items="examples"``, their sizes and ``B``).
        examples: the micro-batches' examples, when the caller knows them (saves reading
            each batch's dimension 0).
        device: where each micro-batch is moved; None leaves it in place.
        amp_dtype: autocast dtype for the forward and loss (None: no autocast).
        weighted_loss: replaces ``forward_and_loss(...) x weight`` (see :data:`WeightedLoss`);
            ``device``, ``amp_dtype`` and ``loss_scale`` are then the caller's business.
        loss_scale: a factor every weighted loss is multiplied by before its backward, and
            :attr:`Accumulated.loss` is not: a data-parallel reduction that *averages* the
            processes' gradients (FSDP) needs their number here, so that the average of the
            processes' sums is the step's mean-loss gradient.
        backward: runs the backward of the weighted loss (default ``loss.backward()``; e.g.
            ``lambda loss: scaler.scale(loss).backward()`` for fp16).
        after_backward: called after each micro-batch's backward with a :class:`MicroStep`
            (e.g. to read micro-batch gradient norms).

    Returns:
        An :class:`Accumulated`.

    Raises:
        ValueError: for a non-scalar loss (see :func:`autobatch.batch.check_scalar_loss`),
            bad ``loss_items``, a step with no loss item at all, or ``counts`` without
            ``total_items``.
    """
    if counts is not None:
        if total_items is None:
            raise ValueError("accumulate_gradients(counts=...) needs total_items=, the step's loss items "
                             "over all processes (count_step_items returns both)")
        batches: Iterable[Any] = micro_batches
        total = int(total_items)
    else:
        iterator = iter(micro_batches)
        first = next(iterator, None)
        if first is None:
            raise ValueError("accumulate_gradients got no micro-batch")
        mode = resolve_loss_items(loss_items, first, loss_fn=loss_fn, forward_loss=forward_loss)
        if mode == "examples" and step_examples is not None:
            batches, total = _chain([first], iterator), int(step_examples)
            del first  # streamed: each micro-batch is freed once the next one runs
        else:
            batches = [first, *iterator]
            counts, total = count_step_items(batches, mode, model=model, loss_fn=loss_fn,
                                             forward_loss=forward_loss, all_reduce_items=all_reduce_items)
            if mode == "examples" and step_examples is not None:
                total = int(step_examples)
    if total <= 0:
        raise ValueError(f"total_items must be > 0 (got {total}); it is the step's loss items over all processes")
    dev = canonical_device(device) if device is not None else None
    # reentrant: made once per step, and not at all in full precision
    cast = autocast(dev if dev is not None else model_device(model), amp_dtype) if amp_dtype is not None else None
    loss_sum: torch.Tensor | None = None
    items_done: list[int] = []
    examples_done: list[int] = []
    for index, batch in enumerate(batches):
        size = batch_size_of(batch) if examples is None else examples[index]
        items = size if counts is None else counts[index]
        items_done.append(items)
        examples_done.append(size)
        if items == 0:
            continue
        weight = items / total
        if weighted_loss is not None:
            scaled = weighted_loss(batch, weight)
        else:
            if dev is not None:
                batch = move_to(batch, dev)
            if amp_dtype is None:  # no context at all: a small step's overhead counts
                mean = forward_and_loss(model, batch, loss_fn, forward_loss)[0]
            else:
                with cast:
                    mean = forward_and_loss(model, batch, loss_fn, forward_loss)[0]
            if mean.dtype != torch.float32:
                mean = mean.float()
            factor = weight * loss_scale
            scaled = mean * factor if factor != 1.0 else mean
            del mean
        if backward is None:
            scaled.backward()
        else:
            backward(scaled)
        # One micro-batch of weight 1 costs no tensor op here (a small step's overhead counts),
        # and no storage outlives the micro-batch but the sum's (a budget counts every byte).
        part = scaled.detach() if loss_scale == 1.0 or weighted_loss is not None else scaled.detach() / loss_scale
        loss_sum = part if loss_sum is None else loss_sum + part
        del scaled, part
        if after_backward is not None:
            applied = weight if weighted_loss is not None else weight * loss_scale
            after_backward(MicroStep(index, batch, size, items, applied))
    return Accumulated(loss_sum, total, items_done, examples_done)


def check_mean_reduced(
    model: nn.Module, source: BatchSource, *, loss_fn: LossFn | None = None, forward_loss: ForwardLoss | None = None,
    loss_items: LossItems = "auto", device: torch.device | None = None, amp_dtype: torch.dtype | None = None,
    examples: int = 6,
) -> Literal["examples", "tokens"] | Callable[[Any], Any]:
    """Refuse a loss summed over the batch, before any training; return ``loss_items`` resolved.

    The loss of the first 6 examples as one batch is compared with the losses of its two
    parts, ``L1`` of 2 examples and ``L2`` of 4 (with ``n1`` and ``n2`` loss items). A
    mean-reduced loss gives ``(n1 L1 + n2 L2) / (n1 + n2)``; a summed one (``reduction="sum"``,
    or a sum over a fixed denominator) gives ``L1 + L2``, 1.5 to 3 times as much, and would
    scale every gradient with ``B`` (the LR rules and the noise scale assume a mean). The parts
    are unequal so that a mean loss growing as ``log B`` (a contrastive loss at
    initialisation: ``log 6`` against ``log 2 + log 4``) does not pass for a sum. The three passes run in eval mode
    (no dropout; BatchNorm on its running statistics, so examples do not interact) without
    gradients, and leave weights, buffers, RNGs and ``.grad`` as they were. The check refuses
    only when the sum matches within 2% (low precision) and the mean is off by 30% or more, so
    a loss that couples the examples of a batch (contrastive losses, mixup in a collate
    function) is let through. Nothing is collated one example at a time (a collate function
    may need an even batch). Skipped with fewer than ``examples`` examples (data, or the
    micro-batch cap), or when the passes fail (out of memory, or a model whose eval mode
    computes no loss): training reports its own errors.

    Args:
        model: the model, on ``device``.
        source: the training data.
        loss_fn, forward_loss, loss_items: as given to the entry point.
        device: where the batch is moved (None: left where it is).
        amp_dtype: autocast dtype of the training step (None: full precision).
        examples: the most examples one pass may hold (the micro-batch cap); below 6 the
            check is skipped.

    Returns:
        ``loss_items`` resolved for this data and loss (:func:`resolve_loss_items`).

    Raises:
        ValueError: the loss is summed over the batch (the message gives the three losses
            and the fix).
    """
    k = min(6, examples, len(source))
    whole = source.batch(torch.arange(k if k % 2 == 0 or k == 1 else k - 1))  # no 1-example collate
    mode = resolve_loss_items(loss_items, whole, loss_fn=loss_fn, forward_loss=forward_loss)
    if k < 6:
        return mode
    halves = [source.batch(torch.arange(0, 2)), source.batch(torch.arange(2, 6))]
    dev = device if device is not None else model_device(model)

    def loss_and_items(batch: Any) -> tuple[float, int]:
        batch = move_to(batch, dev) if device is not None else batch
        with autocast(dev, amp_dtype):
            loss = forward_and_loss(model, batch, loss_fn, forward_loss)[0]
        items = count_loss_items(batch, mode, model=model, loss_fn=loss_fn, forward_loss=forward_loss)
        return float(loss), int(items)

    try:
        with preserved_state(model, train=False), torch.no_grad():
            (full, _), (l1, n1), (l2, n2) = (loss_and_items(b) for b in (whole, *halves))
    except Exception:  # e.g. out of memory, or a model whose eval mode computes no loss:
        return mode  # the check is skipped, and training reports its own errors

    if n1 + n2 == 0 or not all(math.isfinite(v) for v in (full, l1, l2)) or full == 0.0:
        return mode
    mean, total = (n1 * l1 + n2 * l2) / (n1 + n2), l1 + l2
    if abs(full - total) <= 0.02 * abs(full) and abs(full - mean) >= 0.3 * abs(full):
        who = "forward_loss" if forward_loss is not None else "loss_fn" if loss_fn is not None else "the model's loss"
        raise ValueError(
            f"{who} looks summed over the batch, not averaged: the loss of 6 examples as one batch is "
            f"{full:.6g}, the sum of the losses of its first 2 and last 4 ({l1:.6g} + {l2:.6g}) rather "
            f"than their mean ({mean:.6g}). autobatch needs a mean-reduced loss (a sum grows with the batch size, which "
            "breaks the LR rules and the noise scale): use reduction='mean' (e.g. nn.CrossEntropyLoss()), "
            "or divide the sum by the batch's examples or tokens"
        )
    return mode


def _chain(first: list[Any], rest: Iterable[Any]) -> Iterable[Any]:
    """``first[0]``, then ``rest``, holding no reference to ``first[0]`` once it is handed out."""
    yield first.pop()
    yield from rest


def _to_ints(counts: list[int | torch.Tensor]) -> list[int]:
    tensors = [c for c in counts if isinstance(c, torch.Tensor)]
    if not tensors:
        return [int(c) for c in counts]
    values = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist())
    out = [int(next(values)) if isinstance(c, torch.Tensor) else int(c) for c in counts]
    if any(c < 0 for c in out):
        raise ValueError(f"loss item counts must be >= 0 (got {out})")
    return out
