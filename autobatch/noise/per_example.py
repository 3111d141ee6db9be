"""Exact per-example squared gradient norms from one ordinary backward pass.

:class:`PerExampleNormCollector` hooks every layer that owns trainable parameters: a forward hook
keeps the layer's input and puts a tensor hook on its output, which receives the output
gradient during ``backward``. From the pair, :mod:`autobatch._per_example_math` gives each
example's squared gradient norm for that layer without forming ``B x P`` gradients
(``nn.Linear`` with 2-D or 3-D inputs, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``,
``nn.LayerNorm``). Any other module with parameters of its own is handled by ``torch.func``
(``vmap(grad(...))`` over that module alone, which does form its per-example gradients and
re-runs its forward, replaying the RNG so that dropout draws the masks the real forward drew).
Parameters the root module uses directly (a ViT's ``cls_token``) and layers called without
the batch (``pos_emb(arange(T))``, broadcast over the batch) are followed to the op where they
meet the batch (:mod:`autobatch.noise._broadcast`), so they cost one op, not a re-run of the
model. Norms of different layers add up, since the per-example gradient is the concatenation
of the layers' gradients.

What cannot be measured raises :class:`UnsupportedForPerExample` (a ``ValueError``), before
any work where the model's structure shows it (:func:`per_example_supported` says so without
raising): BatchNorm in train mode (it mixes the examples), tied weights, GRU/RNN layers
(``torch.func`` cannot run them), embeddings with ``scale_grad_by_freq``. Fed with ``b = 1``
into :class:`autobatch.GradientNoiseScale`, these norms give the per-example estimator.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from autobatch.data import batch_size_of
from autobatch.noise import _per_example_math as pm
from autobatch.noise._broadcast import BroadcastTracker
from autobatch.noise._per_example_plan import (
    HINT,
    Call,
    Layer,
    UnsupportedForPerExample,
    batchnorm_reason,
    structure,
)
from autobatch.noise.micro_batch import LossReduction, trainable_parameters

__all__ = ["PerExampleNormCollector", "UnsupportedForPerExample", "per_example_supported"]


class PerExampleNormCollector:
    """Per-example squared gradient norms of the loss of each example, from one backward.

    Usage, one forward and one backward per measurement::

        with PerExampleNormCollector(model) as per_example:
            loss = loss_fn(model(x), y)        # mean over the B examples of x
            loss.backward()
            sq = per_example.sq_norms()        # shape (B,): |grad of loss_i|^2 for each i

    ``sq[i]`` is the squared norm of the gradient of example ``i``'s own loss ``l_i``; with a
    mean-reduced loss the backward sees ``l_i / B``, so the measured contribution is scaled by
    ``B^2`` (``loss_reduction="sum"``: not scaled). Frozen parameters are left out. The model
    must take the batch along dimension 0 of every hooked layer's input and output.

    Not supported (each raises :class:`UnsupportedForPerExample` rather than giving a wrong
    number, at construction where the structure shows it): BatchNorm in train mode (examples
    mixed), ``nn.Embedding(scale_grad_by_freq=True)``, a parameter shared by two layers (tied
    weights), ``nn.GRU`` / ``nn.RNN``, a parameter used outside the forward of the module that
    owns it (other than by the root module), a layer whose inputs hold the batch along
    another dimension. Activation checkpointing is not supported either. A 1-D input equal to
    ``arange(B)`` given to an ``nn.Embedding`` is read as positions (shared by every example),
    not as one index per example.

    Args:
        model: the model; hooks go on its layers now and stay until :meth:`remove`.
        loss_reduction: ``"mean"`` (default) or ``"sum"``, how the loss passed to
            ``backward`` reduces over the batch.

    Raises:
        ValueError: for no trainable parameter or an unknown ``loss_reduction``.
        UnsupportedForPerExample: for a model the structure shows cannot be measured (see
            above; :func:`per_example_supported` tells without raising).
    """

    def __init__(self, model: nn.Module, loss_reduction: LossReduction = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_reduction must be 'mean' or 'sum' (got loss_reduction={loss_reduction!r})"
            )
        self.loss_reduction = loss_reduction
        trainable_parameters(model)  # raises if there is none
        self._layers, self._root_params, owner = structure(model, train=None)
        self._handles: list[Any] = []
        self._got_grad: set[int] = set()
        # torch.compile'd (a wrapper, or module.compile()): a graph compiled before these hooks
        # were added keeps running without them (dynamo does not guard on hooks added later)
        self._compiled = type(model).__name__ == "OptimizedModule" or any(
            getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer), with_kwargs=True))
            if layer.kind == "func":
                self._handles.append(layer.module.register_forward_pre_hook(self._make_rng_hook(layer)))
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                self._handles.append(module.register_forward_pre_hook(self._make_batchnorm_check(name)))
        for param in owner:
            self._handles.append(param.register_hook(self._make_param_flag(param)))
        self._param_owner = owner
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_model_forward, always_call=True))
        self._batch: int | None = None
        self._total: torch.Tensor | None = None
        self._recomputing = False
        self._tracker: BroadcastTracker | None = None
        self._tracking = False  # the tracker's mode is on the stack

    # -- hooks -------------------------------------------------------------------------------
    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recomputing or not torch.is_grad_enabled():
            return
        if self._batch is not None:
            raise RuntimeError(
                "PerExampleNormCollector saw a second forward before sq_norms() read the first; "
                "run one forward and one backward, then call sq_norms(), per measurement"
            )
        self._batch = batch_size_of(args if args else tuple(kwargs.values()))
        if self._root_params:
            for param in self._root_params.values():
                self._track().add_source(param)

    def _after_model_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._tracking:
            self._tracking = False
            self._tracker.__exit__(None, None, None)

    def _track(self) -> BroadcastTracker:
        """The broadcast tracker of this forward, its mode entered for the rest of it."""
        if self._tracker is None:
            self._tracker = BroadcastTracker(self._batch)
        if not self._tracking:
            self._tracker.__enter__()
            self._tracking = True
        return self._tracker

    def _paused(self):
        return self._tracker.paused() if self._tracking else contextlib.nullcontext()

    def _make_rng_hook(self, layer: Layer):
        def save(module: nn.Module, args: tuple) -> None:
            # The RNG state before the layer runs, so that its re-run under vmap draws the
            # same dropout masks (vmap's randomness="different" draws the batch's in one go).
            if torch.is_grad_enabled() and not self._recomputing and self._batch is not None:
                cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
                layer.rng = (torch.get_rng_state(), cuda)

        return save

    def _make_batchnorm_check(self, name: str):
        def check(module: nn.Module, args: tuple) -> None:
            if module.training and torch.is_grad_enabled() and not self._recomputing:
                raise UnsupportedForPerExample(batchnorm_reason(name, module))

        return check

    def _make_param_flag(self, param: nn.Parameter):
        def flag(g: torch.Tensor) -> None:
            self._got_grad.add(id(param))

        return flag

    def _make_forward_hook(self, layer: Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._recomputing or not torch.is_grad_enabled() or self._batch is None:
                return
            with self._paused():
                self._record_call(layer, module, args, kwargs, output)

        return hook

    def _shared(self, t: Any) -> bool:
        return self._tracker is not None and self._tracker.is_shared(t)

    def _without_batch(self, layer: Layer, x: Any) -> bool:
        """Whether a closed-form layer's input is shared by the examples (no batch dim)."""
        if not isinstance(x, torch.Tensor):
            return False
        if self._shared(x) or x.ndim == 0 or x.shape[0] != self._batch:
            return True
        # pos_emb(arange(T)) with T == B by coincidence: positions, not one index per example.
        return (layer.kind == "embedding" and x.ndim == 1
                and torch.equal(x, torch.arange(x.shape[0], device=x.device, dtype=x.dtype)))

    def _record_call(self, layer: Layer, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        outputs = _tensor_outputs(output)
        if not any(o.requires_grad for o in outputs):
            return
        if layer.kind != "func" and args and self._without_batch(layer, args[0]):
            # Called without the batch (positions): its output is shared by the examples,
            # and its per-example output gradients are read where it meets the batch.
            out = outputs[0]
            self._track().add_source(out)
            layer.deferred = layer.called = True
            layer.calls.append(Call(args=tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                     kwargs={}, outputs=[out.detach()], waiting=0, shared_output=out))
            return
        for t in (*args, *outputs):
            if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] != self._batch and not self._shared(t):
                raise UnsupportedForPerExample(
                    f"layer '{layer.name}' ({type(module).__name__}) has a tensor of shape "
                    f"{tuple(t.shape)} whose dimension 0 is not the batch ({self._batch} "
                    "examples); per-example norms need the batch along dimension 0 of "
                    f"every layer's inputs and outputs (e.g. batch_first=True), or {HINT}"
                )
        call = Call(
            args=tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
            kwargs={k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
            outputs=[o.detach() for o in outputs],
            waiting=sum(o.requires_grad for o in outputs),
            rng=layer.rng,
        )
        layer.calls.append(call)
        layer.called = True
        for i, out in enumerate(outputs):
            if out.requires_grad:
                out.register_hook(self._make_output_hook(layer, call, i))

    def _make_output_hook(self, layer: Layer, call: Call, index: int):
        def hook(g: torch.Tensor) -> None:
            call.grads[index] = g.detach()
            call.waiting -= 1
            # Finish a closed-form layer as soon as all its calls have their gradients, so
            # that its inputs are freed during backward rather than at the end; torch.func
            # layers wait for sq_norms(), outside the backward pass.
            if layer.kind != "func" and not layer.deferred and all(c.waiting == 0 for c in layer.calls):
                self._finish(layer)

        return hook

    # -- results -----------------------------------------------------------------------------
    def _finish(self, layer: Layer) -> None:
        calls = [c for c in layer.calls if c.grads]
        layer.calls = []
        if not calls:
            return
        try:
            sq = _layer_sq_norms(layer, calls, self)
        except Exception as err:
            if layer.kind != "func":
                raise
            raise UnsupportedForPerExample(
                f"torch.func cannot compute the per-example gradients of layer '{layer.name}' "
                f"({type(layer.module).__name__}): {type(err).__name__}: {err}; {HINT}"
            ) from err
        self._add(sq)

    def _add(self, sq: torch.Tensor) -> None:
        self._total = sq if self._total is None else self._total + sq

    def _finish_shared(self) -> None:
        """Per-example norms of what the broadcast tracker followed: root-owned parameters,
        and layer calls without the batch (their inputs expanded over the examples, their
        output gradients per example, so the closed forms apply)."""
        try:
            rows = self._tracker.per_example_grads() if self._tracker is not None else {}
        except Exception as err:
            raise UnsupportedForPerExample(
                f"cannot follow a tensor shared by the examples (a root-owned parameter or a "
                f"layer called without the batch) to where it meets the batch: "
                f"{type(err).__name__}: {err}; {HINT}"
            ) from err
        for name, param in self._root_params.items():
            g = rows.get(id(param))
            if g is None:
                if id(param) in self._got_grad:
                    raise UnsupportedForPerExample(
                        f"parameter '{name}' of the root module reaches the loss without meeting "
                        f"the batch (used only in ops without batched inputs); {HINT}")
                continue
            self._add(_wide(g).reshape(self._batch, -1).square().sum(dim=1))
        for layer in self._layers:
            if not layer.deferred:
                continue
            calls = []
            for call in layer.calls:
                if call.shared_output is None:
                    calls.append(call)
                elif (g := rows.get(id(call.shared_output))) is not None:
                    calls.append(_expanded(call, g, self._batch))
            layer.calls = calls

    def sq_norms(self, *, loss_weight: float = 1.0, grad_scale: float = 1.0) -> torch.Tensor:
        """Per-example squared gradient norms of the last forward/backward, then reset.

        Args:
            loss_weight: a factor the loss was multiplied by before ``backward`` (e.g.
                ``b/B`` when this batch is one micro-batch of a bigger step).
            grad_scale: the AMP loss scale the loss was multiplied by.

        Returns:
            Float tensor of shape ``(B,)`` on the model's device: ``|d l_i / d theta|^2``.

        Raises:
            RuntimeError: if no forward with gradients was recorded.
            UnsupportedForPerExample: if a parameter received a gradient while its layer was
                never called (it is used outside the layer), or torch.func cannot run a layer.
        """
        if self._batch is None:
            raise RuntimeError("sq_norms() needs a forward and a backward of the model first")
        try:
            self._finish_shared()
            for layer in self._layers:
                if layer.calls:  # outputs that never received a gradient count as zero
                    self._finish(layer)
            for layer in self._layers:
                if not layer.called and any(id(p) in self._got_grad for p in layer.params.values()):
                    if self._compiled:
                        raise UnsupportedForPerExample(
                            f"layer '{layer.name}' ({type(layer.module).__name__}) ran inside a torch.compile'd "
                            "graph that skips the per-example hooks: torch.compile reuses a graph compiled "
                            "before the hooks were added (it does not check for hooks added later, e.g. when "
                            "the compiled model was trained or evaluated before); call torch._dynamo.reset() "
                            f"before this run to recompile with them, or {HINT}"
                        )
                    raise UnsupportedForPerExample(
                        f"a parameter of layer '{layer.name}' ({type(layer.module).__name__}) got a "
                        "gradient but the layer's forward never ran: the parameter is used "
                        "outside it (e.g. F.linear(x, layer.weight)); per-example norms cannot "
                        f"see that use, {HINT}"
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
        self._after_model_forward(None, (), None)  # a forward that raised may have left it on
        self._batch, self._total, self._tracker = None, None, None
        self._got_grad = set()
        for layer in self._layers:
            layer.calls, layer.called, layer.deferred, layer.rng = [], False, False, None

    # -- lifetime ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook."""
        self._after_model_forward(None, (), None)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> PerExampleNormCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def per_example_supported(model: nn.Module, *, train: bool | None = True) -> str | None:
    """Why per-example norms cannot be measured on ``model`` (the message
    :class:`UnsupportedForPerExample` would carry), or None if its structure allows them.

    It checks what the structure shows, without running the model: BatchNorm using batch
    statistics (in train mode when ``train`` is True, the default, as in training; each
    module's current mode when None), tied weights, GRU/RNN layers, embeddings with
    ``scale_grad_by_freq``, no trainable parameter. What only a forward can show (a layer
    whose inputs hold the batch along another dimension, a parameter used outside its
    layer) still raises :class:`UnsupportedForPerExample` during the first measurement.
    """
    try:
        trainable_parameters(model)
        structure(model, train)
    except ValueError as err:  # UnsupportedForPerExample, or no trainable parameter
        return str(err)
    return None


def _expanded(call: Call, g: torch.Tensor, batch: int) -> Call:
    """A call without the batch as a call over the batch: its input repeated for every
    example, its output gradient per example (``g``, shape ``(B, *output.shape)``)."""
    x, out = call.args[0], call.outputs[0]
    if x.ndim > 0 and x.shape[0] == 1 and out.ndim > 0 and out.shape[0] == 1:
        x, g = x.expand(batch, *x.shape[1:]), g.reshape(batch, *out.shape[1:])
    else:
        x = x.unsqueeze(0).expand(batch, *x.shape)
    return Call(args=(x, *call.args[1:]), kwargs=call.kwargs, outputs=[g], waiting=0, grads={0: g})


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


def _layer_sq_norms(layer: Layer, calls: list[Call], collector: PerExampleNormCollector) -> torch.Tensor:
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


def _func_per_example_grads(layer: Layer, call: Call, batch: int) -> dict[str, torch.Tensor]:
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

    # randomness="different" draws the whole batch's random numbers in one call, as the real
    # forward did; replaying the RNG state from before that forward gives the same masks.
    per_example = vmap(grad(contribution), in_dims=(None, arg_dims, kwarg_dims, 0),
                       randomness="different")
    cuda = [torch.cuda.current_device()] if call.rng is not None and call.rng[1] is not None else []
    with torch.random.fork_rng(devices=cuda):
        if call.rng is not None:
            torch.set_rng_state(call.rng[0])
            if call.rng[1] is not None:
                torch.cuda.set_rng_state(call.rng[1])
        return per_example(params, call.args, call.kwargs, grads_out)
