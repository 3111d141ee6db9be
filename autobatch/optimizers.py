"""The optimizer spec: one way to say which optimizer to use, in every entry point.

``fit``, ``probe_memory``, ``tune_lr`` and ``search`` take ``optimizer=`` as any of:

- a class, e.g. ``torch.optim.AdamW``: built as ``cls(params, lr=lr)``, so ``lr`` is needed;
- a factory ``f(params)`` that holds its hyperparameters, e.g.
  ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)``: ``lr`` is optional; given,
  it is passed as ``f(params, lr=lr)`` when ``f`` takes an ``lr``, else it sets the LRs of
  ``f(params)``'s param groups as for an instance;
- an optimizer instance built over the model's parameters: used as it is by ``fit``; where
  another optimizer over other tensors is needed (the memory probe's stand-in parameters,
  the trials of ``lr="auto"``), :func:`copy_for` rebuilds it faithfully: the same class with
  every param group's hyperparameters (``type(opt)(params, **opt.defaults)`` is not enough:
  ``AdamW.defaults`` holds keys its constructor refuses, and per-group settings are lost).

``lr`` given with an instance (or a factory's own groups) is the **first** param group's LR,
and every other group keeps its ratio to it (:func:`scale_lrs`): a head at 10x the body's LR
stays at 10x, a group at LR 0 stays frozen. The first group's LR is also what ``fit``
records as the step's LR.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["OptimizerSpec", "build_optimizer", "copy_for", "scale_lrs"]

OptimizerSpec = type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer] | torch.optim.Optimizer


def _takes_lr(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume the usual (params, lr)
        return True
    return "lr" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _needs_lr(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    lr = parameters.get("lr")
    return lr is not None and lr.default is inspect.Parameter.empty


def _check_lr(lr: float | None) -> None:
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0 (got lr={lr})")


def _check_result(opt: Any, spec: Any) -> torch.optim.Optimizer:
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer factory {spec!r} returned a {type(opt).__name__}, not a "
            "torch.optim.Optimizer; a factory is f(params) -> Optimizer"
        )
    return opt


def scale_lrs(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set ``opt``'s base LR to ``lr``: the first param group's LR becomes ``lr`` and every
    other group's is scaled by the same factor, so the ratios between groups are kept (groups
    that all share one LR, whatever it is, all get ``lr``).

    Raises:
        ValueError: groups of different LRs whose first is not > 0 (no ratio to keep).
    """
    lrs = [group["lr"] for group in opt.param_groups]
    if all(x == lrs[0] for x in lrs):
        ratios = [1.0] * len(lrs)
    elif not (isinstance(lrs[0], (int, float)) and lrs[0] > 0):
        raise ValueError(
            f"cannot set lr={lr} on the {type(opt).__name__}: lr is the first param group's LR and the others "
            f"keep their ratio to it, but its groups' LRs are {lrs}; give the first group an LR > 0, or pass "
            "lr=None to train with the groups' own LRs"
        )
    else:
        ratios = [x / lrs[0] for x in lrs]
    for group, ratio in zip(opt.param_groups, ratios):
        group["lr"] = lr * ratio


def build_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.Tensor], lr: float | None = None
) -> torch.optim.Optimizer:
    """The optimizer a spec describes, over ``params`` (see the module docstring).

    Args:
        spec: a class, a factory ``f(params)`` or ``f(params, lr)``, or an instance.
        params: the model's parameters (``model.parameters()``). A class or factory gets
            those that require a gradient, in this order; an instance must hold only these.
        lr: the base learning rate; required for a class, optional otherwise.

    Returns:
        A new optimizer, or the instance itself (its LRs set by :func:`scale_lrs` when ``lr``
        is given).

    Raises:
        ValueError: ``lr <= 0``, ``lr`` missing for a class or for a factory that requires it,
            or an instance holding tensors outside ``params``.
        TypeError: a spec of no known form, or a factory that returns something else.
    """
    _check_lr(lr)
    params = list(params)
    trainable = [p for p in params if p.requires_grad]
    if isinstance(spec, torch.optim.Optimizer):
        allowed = {id(p) for p in params}
        if any(id(p) not in allowed for g in spec.param_groups for p in g["params"]):
            raise ValueError(
                f"the {type(spec).__name__} instance holds tensors that are not the model's "
                "parameters; build it over model.parameters(), or pass a factory such "
                "as functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)"
            )
        if lr is not None:
            scale_lrs(spec, lr)
        return spec
    if isinstance(spec, type):
        if not issubclass(spec, torch.optim.Optimizer):
            raise TypeError(f"optimizer class {spec.__name__} is not a torch.optim.Optimizer")
        if lr is None:
            raise ValueError(
                f"lr is required with an optimizer class ({spec.__name__}): the base learning "
                "rate at initial_batch_size (e.g. lr=0.1 for SGD, lr=1e-3 for Adam), or pass a "
                f"factory holding it, e.g. functools.partial({spec.__name__}, lr=...); "
                "autobatch.tune_lr can find it"
            )
        return spec(trainable, lr=lr)
    if not callable(spec):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer class, a factory params -> Optimizer, "
            f"or an instance (got {type(spec).__name__})"
        )
    if lr is None:
        if _needs_lr(spec):
            raise ValueError(
                f"lr is required: the optimizer factory {getattr(spec, '__name__', spec)!r} "
                "takes lr without a default; pass lr=..., or a factory holding it"
            )
        return _check_result(spec(trainable), spec)
    if _takes_lr(spec):
        return _check_result(spec(trainable, lr=lr), spec)
    opt = _check_result(spec(trainable), spec)
    scale_lrs(opt, lr)
    return opt


def copy_for(
    spec: OptimizerSpec, stand_ins: Mapping[torch.Tensor, torch.Tensor], lr: float | None = None
) -> torch.optim.Optimizer:
    """An optimizer like the one ``spec`` describes, over stand-ins of the model's tensors.

    Used where the training step must run on other tensors than the model's own (the memory
    probe's fake parameters), or on the same ones from a fresh state (``stand_ins`` mapping
    every parameter to itself: a trial of ``lr="auto"``). Its state starts empty.

    Args:
        spec: a class, factory or instance (module docstring).
        stand_ins: each parameter of the model mapped to the tensor that stands in for it,
            in ``model.parameters()`` order; a class or factory gets the stand-ins of the
            parameters that require a gradient.
        lr: the learning rate: for a class (default: the class's own default, which is
            enough where only the optimizer's memory matters), and for an instance the first
            group's, the others keeping their ratio to it (:func:`scale_lrs`; default: the
            instance's own LRs).

    Raises:
        ValueError: an instance holding tensors not in ``stand_ins``.
        TypeError: an instance whose class cannot be rebuilt from its param groups (the
            message suggests a factory), or a spec of no known form.
    """
    if isinstance(spec, torch.optim.Optimizer):
        try:
            groups = [{**{k: v for k, v in g.items() if k != "params"},
                       "params": [stand_ins[p] for p in g["params"]]} for g in spec.param_groups]
        except KeyError:
            raise ValueError(
                f"the {type(spec).__name__} instance holds tensors that are not the model's "
                "parameters; build it over model.parameters(), or pass a factory such "
                "as functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)"
            ) from None
        try:
            # Every hyperparameter lives in the param groups (torch copies the constructor's
            # defaults into each group), so groups are a faithful description.
            copy = type(spec)(groups)
        except TypeError as err:
            raise TypeError(
                f"cannot rebuild {type(spec).__name__} from its param groups ({err}); pass a "
                f"factory instead, e.g. functools.partial({type(spec).__name__}, ...)"
            ) from err
        if lr is not None:
            scale_lrs(copy, lr)
        return copy
    params = [s for p, s in stand_ins.items() if p.requires_grad]
    if isinstance(spec, type) and lr is None:
        return spec(params)
    return build_optimizer(spec, params, lr)
