"""The batch protocol: how one batch becomes one loss, the same in every entry point.

``fit``, ``probe_memory``, ``measure_noise_scale``, ``evaluate`` and the studies all call
:func:`forward_and_loss`, which reads a batch as follows:

================================  ===============================================
batch                              loss
================================  ===============================================
``(input, target)``                ``loss_fn(model(input), target)``
``(x1, ..., xk, target)``          ``loss_fn(model(x1, ..., xk), target)``
dict (or any Mapping)              ``model(**batch).loss`` (or ``["loss"]``), or
                                   ``loss_fn(model(**batch), batch)`` with a loss_fn
anything, with ``forward_loss``    ``forward_loss(model, batch)``
================================  ===============================================

The loss must be a scalar tensor, **mean**-reduced over what the batch holds (examples, or
loss items such as tokens, see :mod:`autobatch.accumulate`): the LR rules and the noise scale
assume a mean. Hugging Face models fit the dict row with no glue: a batch holding ``labels``
makes the model return its own (token-mean) loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ForwardLoss",
    "LossFn",
    "check_scalar_loss",
    "forward_and_loss",
    "output_logits",
    "shifts_labels",
    "target_of",
    "unwrap_model",
]

LossFn = Callable[[Any, Any], torch.Tensor]
ForwardLoss = Callable[[nn.Module, Any], torch.Tensor]

def check_scalar_loss(loss: Any, source: str = "loss_fn") -> torch.Tensor:
    """Return ``loss`` if it is a 0-d floating tensor, else raise naming its shape and the fix.

    Args:
        loss: what ``source`` returned.
        source: who produced it, for the message ("loss_fn", "forward_loss", "the model's
            output .loss").

    Raises:
        ValueError: for a tensor that is not 0-d, or anything that is not a tensor.
    """
    if isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point():
        return loss
    got = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) and loss.ndim
           else f"a {loss.dtype} tensor" if isinstance(loss, torch.Tensor)
           else f"a {type(loss).__name__}")
    raise ValueError(
        f"{source} must return a scalar tensor (got {got}); reduce it with .mean(), e.g. "
        "cross_entropy(..., reduction='mean') (mean-reduced losses are what the LR rules and "
        "the noise scale assume)"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel (or any ``.module`` wrapper)."""
    while isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
        "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
        model = model.module
    return model


def shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s own loss shifts its labels by one position (position ``t`` predicts
    ``labels[t + 1]``): a Hugging Face causal LM. Its loss then averages over ``labels[..., 1:]``,
    which is what token counts and next-token accuracy must read.

    The one check every entry point uses (token counts in :mod:`autobatch.accumulate`, the
    Hugging Face integration's ``num_items_in_batch``, accuracy in :mod:`autobatch.evaluate`):
    the model's loss type maps to the causal LM loss (as ``transformers.Trainer`` checks it),
    or its class is a causal LM (GPT-2 leaves its loss type unset); encoder-decoder models
    are excluded (they feed right-shifted decoder inputs and compare unshifted labels).
    """
    model = unwrap_model(model)
    if not any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__):
        return False
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss:
        return True
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(cls.__name__ in names or cls.__name__.endswith("ForCausalLM") for cls in type(model).__mro__)


def _output_loss(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise ValueError(
            f"the batch is a dict and no loss_fn was given, so the loss is the model output's "
            f".loss, but the model returned a {type(output).__name__} without one; put the "
            "targets in the batch under the key the model reads (Hugging Face: 'labels'), or "
            "pass loss_fn=f(output, batch) -> scalar"
        )
    return check_scalar_loss(loss, "the model output's .loss")


def forward_and_loss(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    forward_loss: ForwardLoss | None = None,
) -> tuple[torch.Tensor, Any]:
    """Run ``model`` on ``batch`` and compute its loss by the protocol (module docstring).

    Args:
        model: the module (or a DDP wrapper, or a ``functional_call`` closure) to call.
        batch: one (micro-)batch, already on the model's device.
        loss_fn: ``loss_fn(output, target)`` for tuple batches, ``loss_fn(output, batch)``
            for dict batches; optional for dicts (then the output's ``.loss``).
        forward_loss: ``forward_loss(model, batch) -> loss``, replacing all of the above.

    Returns:
        ``(loss, output)``: the checked scalar loss and the model's output (None with
        ``forward_loss``, which hides it).

    Raises:
        ValueError: for a non-scalar loss, or a dict batch whose output has no loss.
        TypeError: for a batch of no known form, or a tuple batch without ``loss_fn``.
    """
    if forward_loss is not None:
        return check_scalar_loss(forward_loss(model, batch), "forward_loss"), None
    if type(batch) is tuple and len(batch) >= 2 and loss_fn is not None:  # the common case, first
        output = model(*batch[:-1])
        return check_scalar_loss(loss_fn(output, batch[-1])), output
    if isinstance(batch, Mapping):
        output = model(**batch)
        if loss_fn is None:
            return _output_loss(output), output
        return check_scalar_loss(loss_fn(output, batch)), output
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        if loss_fn is None:
            raise TypeError(
                f"a {type(batch).__name__} batch (inputs..., target) needs loss_fn=f(output, "
                "target) -> scalar; only dict batches may take the loss from the model output"
            )
        output = model(*batch[:-1])
        return check_scalar_loss(loss_fn(output, batch[-1])), output
    shape = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise TypeError(
        f"cannot read a {type(batch).__name__}{shape} batch: batches must be (input, target), "
        "(x1, ..., xk, target) or dicts; for anything else pass forward_loss=f(model, batch) "
        "-> scalar loss"
    )


def target_of(batch: Any) -> torch.Tensor | None:
    """The batch's targets: the last element of a tuple, ``batch["labels"]`` of a dict."""
    if isinstance(batch, Mapping):
        target = batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        target = batch[-1]
    else:
        target = None
    return target if isinstance(target, torch.Tensor) else None


def output_logits(output: Any) -> torch.Tensor | None:
    """The prediction tensor of a model output: the tensor itself, ``.logits`` /
    ``["logits"]`` of a Hugging Face output or dict, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    return logits if isinstance(logits, torch.Tensor) else None
