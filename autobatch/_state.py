"""Leaving a model as it was: the save/restore that measurement, probing and evaluation share.

:func:`train_modes` keeps each module's train/eval flag; :func:`preserved_state` keeps
everything a measurement may disturb: the flags, the random number generators, ``.grad``,
buffers (BatchNorm running statistics), and optionally the weights and an optimizer's state.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["preserved_state", "train_modes"]


@contextmanager
def train_modes(model: nn.Module, train: bool | None = None) -> Iterator[None]:
    """Restore every module's train/eval flag on exit (a per-module mode, such as a frozen
    BatchNorm in eval mode inside a model in train mode, survives).

    Args:
        model: the model.
        train: the mode inside the block (``model.train(train)``); None leaves it.
    """
    modes = [(m, m.training) for m in model.modules()]
    if train is not None:
        model.train(train)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


@contextmanager
def preserved_state(
    model: nn.Module,
    optimizer: Any = None,
    *,
    weights: bool = False,
    offload: bool = False,
    train: bool | None = None,
) -> Iterator[None]:
    """Run a block that may run forward/backward passes (or steps) on ``model``, and leave
    everything as it was.

    Always kept: each module's train/eval flag; the torch (CPU and initialised CUDA devices),
    Python and NumPy RNG states; every parameter's ``.grad`` (the same tensor object, unless
    ``offload``); buffers (values copied back in place). Inside the block every ``.grad``
    starts as None.

    Args:
        model: the model.
        optimizer: an optimizer instance whose state dict is restored with ``weights``
            (anything else is ignored).
        weights: also restore parameter values and the optimizer's state (the block steps).
        offload: keep the saved tensors on the CPU, so the block has the device memory they
            took (``.grad`` is then restored as a copy).
        train: the mode inside the block; None leaves it.
    """
    params = list(model.parameters())
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    save = _cpu_copy if offload else (lambda t: t.detach().clone())
    grads = [p.grad if p.grad is None or not offload else _cpu_copy(p.grad) for p in params]
    with torch.no_grad():
        buffers = [(b, save(b)) for b in model.buffers()]
        values = [(p, save(p)) for p in params] if weights else []
    opt_state = None
    if weights and isinstance(optimizer, torch.optim.Optimizer):
        opt_state = tree_map(lambda v: save(v) if isinstance(v, torch.Tensor) else copy.copy(v),
                             optimizer.state_dict())
    for p in params:
        p.grad = None
    try:
        with train_modes(model, train):
            yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        with torch.no_grad():
            for t, saved in (*buffers, *values):
                t.copy_(saved)
        for p, g in zip(params, grads):
            p.grad = g.to(p.device) if offload and g is not None else g
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
