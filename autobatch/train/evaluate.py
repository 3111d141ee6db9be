"""Evaluation of a model on held-out data: mean loss, and accuracy for classifiers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autobatch.data import as_batch_source, batch_size_of, move_to

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 1024,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss (and accuracy for class logits) of ``model`` over ``data``, in eval mode.

    Returns:
        ``{"val_loss": ...}`` weighted by batch size, plus ``"val_accuracy"`` (a fraction in
        [0, 1]) when the output has one more dimension than an integer target (class logits
        along the last dimension). The model's train/eval mode is restored.
    """
    source = as_batch_source(data, name="val_data")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_total, correct, count, tokens = 0.0, 0, 0, 0
    classify = True
    try:
        for start in range(0, len(source), batch_size):
            batch = source.batch(range(start, min(start + batch_size, len(source))))
            inputs, targets = move_to(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(inputs)
                loss = loss_fn(out, targets)
            b = batch_size_of(targets)
            loss_total += float(loss) * b
            count += b
            classify = classify and isinstance(out, torch.Tensor) and not targets.is_floating_point() \
                and out.ndim == targets.ndim + 1
            if classify:
                correct += int((out.argmax(-1) == targets).sum())
                tokens += targets.numel()
    finally:
        model.train(was_training)
    metrics = {"val_loss": loss_total / count}
    if classify and tokens:
        metrics["val_accuracy"] = correct / tokens
    return metrics
