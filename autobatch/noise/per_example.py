"""Exact per-example squared gradient norms from one ordinary backward pass.

:class:`PerExampleGradNorms` hooks every layer that owns trainable parameters: a forward hook
keeps the layer's input and puts a tensor hook on its output, which receives the output
gradient during ``backward``. From the pair, :mod:`autobatch._per_example_math` gives each
example's squared gradient norm for that layer without forming ``B x P`` gradients
(``nn.Linear`` with 2-D or 3-D inputs, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``,
``nn.LayerNorm``). Any other module with parameters of its own is handled by ``torch.func``
(``vmap(grad(...))`` over that module alone, which does form its per-example gradients and
re-runs its forward). Norms of different layers add up, since the per-example gradient is the
concatenation of the layers' gradients.

Layers that mix the examples of a batch have no per-example gradient: BatchNorm in train mode
raises an error naming the layer. Fed with ``b = 1`` into
:class:`autobatch.GradientNoiseScale`, these norms give the per-example estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.noise import _per_example_math as pm
from autobatch.data import batch_size_of
from autobatch.noise.micro_batch import LossReduction, trainable_parameters

__all__ = ["PerExampleGradNorms"]

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
class _Call:
    """One forward call of a layer: its inputs and, once backward reaches them, the
    gradients of its outputs (by position among its tensor outputs)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]  # detached, for shapes of missing gradients
    waiting: int  # outputs that require grad and have not received it yet
    grads: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str  # a value of _CLOSED_FORM or "func"
    params: dict[str, nn.Parameter]  # trainable parameters it covers, by name in module
    calls: list[_Call] = field(default_factory=list)
    called: bool = False


class PerExampleGradNorms:
    """Per-example squared gradient norms of the loss of each example, from one backward.

    Usage, one forward and one backward per measurement::

        with PerExampleGradNorms(model) as per_example:
            loss = loss_fn(model(x), y)        # mean over the B examples of x
            loss.backward()
            sq = per_example.sq_norms()        # shape (B,): |grad of loss_i|^2 for each i

    ``sq[i]`` is the squared norm of the gradient of example ``i``'s own loss ``l_i``; with a
    mean-reduced loss the backward sees ``l_i / B``, so the measured contribution is scaled by
    ``B^2`` (``loss_reduction="sum"``: not scaled). Frozen parameters are left out. The model
    must take the batch along dimension 0 of every hooked layer's input and output.

    Not supported (each raises an error rather than giving a wrong number): BatchNorm in
    train mode (examples mixed), ``nn.Embedding(scale_grad_by_freq=True)``, a parameter
    shared by two layers (tied weights), a parameter used outside the forward of the module
    that owns it. Activation checkpointing and randomness inside a ``torch.func``-handled
    module are not supported either.

    Args:
        model: the model; hooks go on its layers now and stay until :meth:`remove`.
        loss_reduction: ``"mean"`` (default) or ``"sum"``, how the loss passed to
            ``backward`` reduces over the batch.

    Raises:
        ValueError: for no trainable parameter, an unknown ``loss_reduction``, tied weights,
            or an embedding with ``scale_grad_by_freq``.
    """

    def __init__(self, model: nn.Module, loss_reduction: LossReduction = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_reduction must be 'mean' or 'sum' (got loss_reduction={loss_reduction!r})"
            )
        self.loss_reduction = loss_reduction
        trainable_parameters(model)  # raises if there is none
        self._layers: list[_Layer] = []
        _plan(model, "", self._layers)
        owner = _check_ownership(model, self._layers)
        self._handles: list[Any] = []
        self._got_grad: set[int] = set()
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer), with_kwargs=True))
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                self._handles.append(module.register_forward_pre_hook(self._make_batchnorm_check(name)))
        for param in owner:
            self._handles.append(param.register_hook(self._make_param_flag(param)))
        self._param_owner = owner
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        self._batch: int | None = None
        self._total: torch.Tensor | None = None
        self._recomputing = False

    # -- hooks -------------------------------------------------------------------------------
    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recomputing or not torch.is_grad_enabled():
            return
        if self._batch is not None:
            raise RuntimeError(
                "PerExampleGradNorms saw a second forward before sq_norms() read the first; "
                "run one forward and one backward, then call sq_norms(), per measurement"
            )
        self._batch = batch_size_of(args if args else tuple(kwargs.values()))

    def _make_batchnorm_check(self, name: str):  # noqa: ANN202
        def check(module: nn.Module, args: tuple) -> None:
            if module.training and torch.is_grad_enabled() and not self._recomputing:
                raise ValueError(
                    f"layer '{name}' ({type(module).__name__}) mixes the examples of a batch in "
                    "train mode (it normalises with batch statistics), so per-example gradients "
                    "are not defined; put it in eval mode, replace it with GroupNorm or "
                    "LayerNorm, or measure with micro-batches (method='micro')"
                )

        return check

    def _make_param_flag(self, param: nn.Parameter):  # noqa: ANN202
        def flag(g: torch.Tensor) -> None:
            self._got_grad.add(id(param))

        return flag

    def _make_forward_hook(self, layer: _Layer):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._recomputing or not torch.is_grad_enabled() or self._batch is None:
                return
            outputs = _tensor_outputs(output)
            if not any(o.requires_grad for o in outputs):
                return
            for t in (*args, *outputs):
                if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] != self._batch:
                    raise ValueError(
                        f"layer '{layer.name}' ({type(module).__name__}) has a tensor of shape "
                        f"{tuple(t.shape)} whose dimension 0 is not the batch ({self._batch} "
                        "examples); per-example norms need the batch along dimension 0 of "
                        "every layer's inputs and outputs (e.g. batch_first=True)"
                    )
            call = _Call(
                args=tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                kwargs={k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                outputs=[o.detach() for o in outputs],
                waiting=sum(o.requires_grad for o in outputs),
            )
            layer.calls.append(call)
            layer.called = True
            for i, out in enumerate(outputs):
                if out.requires_grad:
                    out.register_hook(self._make_output_hook(layer, call, i))

        return hook

    def _make_output_hook(self, layer: _Layer, call: _Call, index: int):  # noqa: ANN202
        def hook(g: torch.Tensor) -> None:
            call.grads[index] = g.detach()
            call.waiting -= 1
            # Finish a closed-form layer as soon as all its calls have their gradients, so
            # that its inputs are freed during backward rather than at the end; torch.func
            # layers wait for sq_norms(), outside the backward pass.
            if layer.kind != "func" and all(c.waiting == 0 for c in layer.calls):
                self._finish(layer)

        return hook

    # -- results -----------------------------------------------------------------------------
    def _finish(self, layer: _Layer) -> None:
        calls = [c for c in layer.calls if c.grads]
        layer.calls = []
        if not calls:
            return
        sq = _layer_sq_norms(layer, calls, self)
        self._total = sq if self._total is None else self._total + sq

    def sq_norms(self, *, loss_weight: float = 1.0, grad_scale: float = 1.0) -> torch.Tensor:
        """Per-example squared gradient norms of the last forward/backward, then reset.

        Args:
            loss_weight: a factor the loss was multiplied by before ``backward`` (e.g.
                ``b/B`` when this batch is one micro-batch of a bigger step).
            grad_scale: the AMP loss scale the loss was multiplied by.

        Returns:
            Float tensor of shape ``(B,)`` on the model's device: ``|d l_i / d theta|^2``.

        Raises:
            RuntimeError: if no forward with gradients was recorded, or a parameter received a
                gradient while its layer was never called (it is used outside the layer).
        """
        if self._batch is None:
            raise RuntimeError("sq_norms() needs a forward and a backward of the model first")
        for layer in self._layers:
            if layer.calls:  # outputs that never received a gradient count as zero
                self._finish(layer)
        try:
            for layer in self._layers:
                if not layer.called and any(id(p) in self._got_grad for p in layer.params.values()):
                    raise RuntimeError(
                        f"a parameter of layer '{layer.name}' ({type(layer.module).__name__}) got a "
                        "gradient but the layer's forward never ran: the parameter is used "
                        "outside it (e.g. F.linear(x, layer.weight)); per-example norms cannot "
                        "see that use, measure with micro-batches (method='micro')"
                    )
            batch, total = self._batch, self._total
        finally:
            self._reset()
        scale = (batch if self.loss_reduction == "mean" else 1.0) / (loss_weight * grad_scale)
        if total is None:
            device = next(iter(self._param_owner)).device
            return torch.zeros(batch, device=device)
        return total.float() * scale**2

    def _reset(self) -> None:
        self._batch, self._total = None, None
        self._got_grad = set()
        for layer in self._layers:
            layer.calls, layer.called = [], False

    # -- lifetime ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> PerExampleGradNorms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# -- planning --------------------------------------------------------------------------------
def _closed_form_kind(module: nn.Module) -> str | None:
    for base, kind in _CLOSED_FORM.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return kind
    return None


def _plan(module: nn.Module, name: str, layers: list[_Layer]) -> None:
    """Assign every trainable parameter to one layer: a closed-form layer covers its own
    parameters; another module with parameters of its own covers its whole subtree (its
    children may use their parameters outside their forward, as MultiheadAttention does)."""
    kind = _closed_form_kind(module)
    own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if kind == "embedding" and own and module.scale_grad_by_freq:
        raise ValueError(
            f"layer '{name}' (Embedding) has scale_grad_by_freq=True, which scales gradients by "
            "token counts over the whole batch, so per-example gradients are not defined; "
            "measure with micro-batches (method='micro')"
        )
    if kind is not None:
        if own:
            layers.append(_Layer(name or "<model>", module, kind, own))
        return
    if own:
        subtree = {n: p for n, p in module.named_parameters() if p.requires_grad}
        layers.append(_Layer(name or "<model>", module, "func", subtree))
        return
    for child_name, child in module.named_children():
        _plan(child, f"{name}.{child_name}" if name else child_name, layers)


def _check_ownership(model: nn.Module, layers: list[_Layer]) -> dict[nn.Parameter, str]:
    owner: dict[nn.Parameter, str] = {}
    for layer in layers:
        for param in layer.params.values():
            if param in owner:
                raise ValueError(
                    f"a parameter is shared by layers '{owner[param]}' and '{layer.name}' (tied "
                    "weights); per-example norms need each parameter in one layer, measure "
                    "with micro-batches (method='micro')"
                )
            owner[param] = layer.name
    return owner


# -- per-layer maths dispatch ------------------------------------------------------------------
def _tensor_outputs(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [o for o in output if isinstance(o, torch.Tensor)]
    return []


def _wide(t: torch.Tensor) -> torch.Tensor:
    # Squares of half-precision gradients underflow and overflow; sum them in float32.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _layer_sq_norms(layer: _Layer, calls: list[_Call], collector: PerExampleGradNorms) -> torch.Tensor:
    """Squared norms of one layer's per-example gradient contributions, summed over calls
    (calls of the same layer are extra positions of the same sum, so they concatenate)."""
    module, batch = layer.module, calls[0].outputs[0].shape[0]
    has_w = "weight" in layer.params
    has_b = "bias" in layer.params

    def cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)

    if layer.kind == "linear":
        a = cat([_wide(c.args[0]).reshape(batch, -1, module.in_features) for c in calls], 1)
        g = cat([_wide(c.grads[0]).reshape(batch, -1, module.out_features) for c in calls], 1)
        return pm.linear_sq_norms(a, g, weight=has_w, bias=has_b)
    if layer.kind == "conv":
        patches = cat([pm.conv_patches(module, _wide(c.args[0])) for c in calls], 2)
        g = cat([_wide(c.grads[0]).reshape(batch, module.out_channels, -1) for c in calls], 2)
        return pm.conv_sq_norms(module, patches, g, weight=has_w, bias=has_b)
    if layer.kind == "embedding":
        tokens = cat([c.args[0].reshape(batch, -1) for c in calls], 1)
        g = cat([_wide(c.grads[0]).reshape(batch, -1, module.embedding_dim) for c in calls], 1)
        return pm.embedding_sq_norms(tokens, g, module.num_embeddings, module.padding_idx)
    if layer.kind == "layer_norm":
        width = math.prod(module.normalized_shape)
        x = cat([_wide(c.args[0]).reshape(batch, -1, width) for c in calls], 1)
        g = cat([_wide(c.grads[0]).reshape(batch, -1, width) for c in calls], 1)
        return pm.layer_norm_sq_norms(module, x, g, weight=has_w, bias=has_b)
    collector._recomputing = True  # the re-run forward must not record calls of its own
    try:
        summed: dict[str, torch.Tensor] = {}
        for call in calls:
            for n, per_example in _func_per_example_grads(layer, call, batch).items():
                summed[n] = summed[n] + per_example if n in summed else per_example
    finally:
        collector._recomputing = False
    return sum(_wide(v).reshape(batch, -1).square().sum(dim=1) for v in summed.values())


def _func_per_example_grads(layer: _Layer, call: _Call, batch: int) -> dict[str, torch.Tensor]:
    """``torch.func`` fallback: per-example gradients of ``<module(x_i), g_i>`` with respect to
    the layer's parameters, one example at a time under ``vmap``."""
    module = layer.module
    params = {n: p.detach() for n, p in layer.params.items()}
    grads_out = [call.grads.get(i, torch.zeros_like(o)) for i, o in enumerate(call.outputs)]

    def dim_of(x: Any) -> int | None:
        return 0 if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch else None

    arg_dims = tuple(dim_of(a) for a in call.args)
    kwarg_dims = {k: dim_of(v) for k, v in call.kwargs.items()}

    def contribution(p: dict[str, torch.Tensor], args: tuple, kwargs: dict, outs_grad: list) -> torch.Tensor:
        args = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(args, arg_dims))
        kwargs = {k: v.unsqueeze(0) if kwarg_dims[k] == 0 else v for k, v in kwargs.items()}
        outputs = _tensor_outputs(functional_call(module, p, args, kwargs))
        return sum((o * g.unsqueeze(0)).sum() for o, g in zip(outputs, outs_grad))

    per_example = vmap(grad(contribution), in_dims=(None, arg_dims, kwarg_dims, 0))
    return per_example(params, call.args, call.kwargs, grads_out)
