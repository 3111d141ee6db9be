"""Planning per-example norms: which layer covers which parameter, and what cannot be measured.

:func:`structure` assigns every trainable parameter of a model to one layer (closed form or
``torch.func``) or to the root module (followed op by op, see :mod:`autobatch.noise._broadcast`),
and raises :class:`UnsupportedForPerExample` for what the structure shows cannot be measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["HINT", "Call", "Layer", "UnsupportedForPerExample", "batchnorm_reason", "structure"]

HINT = ("measure with micro-batches instead (gns_method='micro' in fit, method='micro' in "
        "measure_noise_scale)")
# torch.func's vmap cannot run these (in-place ops on the hidden state inside aten::gru).
_NO_VMAP = (nn.GRU, nn.RNN)


class UnsupportedForPerExample(ValueError):
    """The model has a layer whose per-example gradient norms cannot be measured; the
    message names it. Callers can fall back to micro-batch norms."""


# Layers whose per-example norms have a closed form; a subclass counts only if it keeps the
# base class's forward.
_CLOSED_FORM: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Embedding: "embedding",
    nn.LayerNorm: "layer_norm",
}


@dataclass
class Call:
    """One forward call of a layer: its inputs and, once backward reaches them, the
    gradients of its outputs (by position among its tensor outputs)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]  # detached, for shapes of missing gradients
    waiting: int  # outputs that require grad and have not received it yet
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None  # CPU, CUDA states before it ran
    shared_output: torch.Tensor | None = None  # a call without the batch: its live output


@dataclass
class Layer:
    """A module whose trainable parameters' per-example norms are computed together."""

    name: str
    module: nn.Module
    kind: str  # a value of _CLOSED_FORM or "func"
    params: dict[str, nn.Parameter]  # trainable parameters it covers, by name in module
    calls: list[Call] = field(default_factory=list)
    called: bool = False
    deferred: bool = False  # has a call without the batch: finished in sq_norms, all together
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None  # state at its forward pre-hook


# -- planning --------------------------------------------------------------------------------
def _closed_form_kind(module: nn.Module) -> str | None:
    for base, kind in _CLOSED_FORM.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return kind
    return None


def batchnorm_reason(name: str, module: nn.Module) -> str:
    return (f"layer '{name}' ({type(module).__name__}) mixes the examples of a batch in train "
            "mode (it normalises with batch statistics), so per-example gradients are not "
            "defined; put it in eval mode, replace it with GroupNorm or LayerNorm, or " + HINT)


def _plan(module: nn.Module, name: str, layers: list[Layer], root_params: dict[str, nn.Parameter]) -> None:
    """Assign every trainable parameter to one layer: a closed-form layer covers its own
    parameters; another module with parameters of its own covers its whole subtree (its
    children may use their parameters outside their forward, as MultiheadAttention does);
    the root module's own parameters (a user's model, not a torch.nn layer) are followed
    through the ops that use them, and its children planned as usual."""
    kind = _closed_form_kind(module)
    own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if kind == "embedding" and own and module.scale_grad_by_freq:
        raise UnsupportedForPerExample(
            f"layer '{name or '<model>'}' (Embedding) has scale_grad_by_freq=True, which scales "
            "gradients by token counts over the whole batch, so per-example gradients are not "
            f"defined; {HINT}"
        )
    if kind is not None:
        if own:
            layers.append(Layer(name or "<model>", module, kind, own))
        return
    if own and (name or type(module).__module__.startswith("torch.nn")):
        subtree = {n: p for n, p in module.named_parameters() if p.requires_grad}
        for sub_name, sub in module.named_modules(prefix=name):
            if isinstance(sub, _NO_VMAP):
                raise UnsupportedForPerExample(
                    f"layer '{sub_name or '<model>'}' ({type(sub).__name__}) cannot run under "
                    f"torch.func's vmap, which per-example norms of its parameters need; {HINT}"
                    " (nn.LSTM is supported)"
                )
        layers.append(Layer(name or "<model>", module, "func", subtree))
        return
    root_params.update(own)
    for child_name, child in module.named_children():
        _plan(child, f"{name}.{child_name}" if name else child_name, layers, root_params)


def structure(
    model: nn.Module, train: bool | None
) -> tuple[list[Layer], dict[str, nn.Parameter], dict[nn.Parameter, str]]:
    """The layers, the root's own parameters and each parameter's owner.

    Raises:
        UnsupportedForPerExample: for anything the structure shows cannot be measured;
            BatchNorm counts when it would use batch statistics in mode ``train`` (None: each
            module's current mode).
    """
    layers: list[Layer] = []
    root_params: dict[str, nn.Parameter] = {}
    _plan(model, "", layers, root_params)
    owner: dict[nn.Parameter, str] = {p: "<model>" for p in root_params.values()}
    for layer in layers:
        for param in layer.params.values():
            if param in owner:
                raise UnsupportedForPerExample(
                    f"a parameter is shared by layers '{owner[param]}' and '{layer.name}' (tied "
                    f"weights); per-example norms need each parameter in one layer; {HINT}"
                )
            owner[param] = layer.name
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            training = module.training if train is None else train
            if training or module.running_mean is None:
                raise UnsupportedForPerExample(batchnorm_reason(name, module))
    return layers, root_params, owner
