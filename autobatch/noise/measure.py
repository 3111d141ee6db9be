"""One-off measurement of the gradient noise scale at fixed parameters.

:func:`measure_noise_scale` draws ``num_batches`` disjoint batches of ``batch_size`` examples
without replacement (one shuffled pass over the data, as an epoch of training would), runs
forward and backward on each (as ``batch_size / micro_batch_size`` micro-batches), and feeds
the small-batch and whole-batch squared gradient norms to a
:class:`autobatch.GradientNoiseScale` with equal weights. Nothing is stepped; the model comes
back exactly as it went in.

Sampling without replacement from a finite set of ``N`` examples shrinks the variance of a
batch mean by ``(N-b)/(N-1)``, which would bias ``|G|^2`` low by ``tr(Sigma)/(N-1)`` (13% for
``B_simple = 256`` and ``N = 2000``). The estimator is therefore fed the effective batch sizes
``b (N-1)/(N-b)`` (:func:`autobatch._effective_batch.without_replacement_batch_size`), which
makes both averages unbiased for the data set's own (population) ``|G|^2`` and ``tr(Sigma)``;
with replacement no correction would be needed, but a batch could then hold an example twice,
which no training loop does.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from autobatch.noise._effective_batch import without_replacement_batch_size
from autobatch.data import as_batch_source, move_to, split_batch
from autobatch.noise.estimator import GradientNoiseScale
from autobatch.noise.micro_batch import MicroBatchGradNorms, grad_sq_norm, trainable_parameters
from autobatch.noise.per_example import PerExampleGradNorms

__all__ = ["NoiseScaleEstimate", "measure_noise_scale"]

Method = Literal["micro", "per_example"]
_METHODS = ("micro", "per_example")


class NoiseScaleEstimate(BaseModel):
    """Result of :func:`measure_noise_scale`; gradients are of the mean-reduced loss.

    Attributes:
        noise_scale: ``B_simple = tr(Sigma)/|G|^2``, in examples.
        grad_sq: ``|G|^2``, squared norm of the data set's mean gradient.
        trace_cov: ``tr(Sigma)``, per-example gradient variance summed over parameters.
        noise_scale_stderr: standard error of ``noise_scale`` over the batches (delta method;
            ``inf`` with one batch or a non-positive ``|G|^2`` average).
        samples_used: examples that went through forward and backward.
        num_batches: batches (steps) averaged.
        method: ``"micro"`` (small batches are micro-batches) or ``"per_example"``
            (small batches are single examples).
        batch_size: examples per batch, ``B``.
        micro_batch_size: examples per forward/backward.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_scale: float
    grad_sq: float
    trace_cov: float
    noise_scale_stderr: float
    samples_used: int
    num_batches: int
    method: str
    batch_size: int
    micro_batch_size: int


def measure_noise_scale(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    batch_size: int,
    micro_batch_size: int | None = None,
    num_batches: int | None = None,
    method: Method = "micro",
    seed: int | None = None,
    train: bool = True,
) -> NoiseScaleEstimate:
    """Measure ``B_simple``, ``|G|^2`` and ``tr(Sigma)`` of ``model`` on ``data``.

    Args:
        model: the model, on the device to measure on; batches are moved to the device of
            its first trainable parameter.
        data: a map-style Dataset of ``(input, target)`` pairs, a tuple ``(X, y)``, or a
            DataLoader (see :func:`autobatch.data.as_batch_source`).
        loss_fn: ``loss_fn(model(input), target)``, a scalar loss **mean**-reduced over the
            batch it is given.
        batch_size: examples per batch ``B``, at least 2.
        micro_batch_size: examples per forward/backward; must divide ``batch_size``. For
            ``method="micro"`` these are the small batches (default: the largest divisor of
            ``batch_size`` not above ``batch_size // 8``, about 8 micro-batches); for
            ``"per_example"`` it only bounds memory (default ``batch_size``).
        num_batches: batches to average (default: as many as the data holds, one pass).
        method: ``"micro"`` or ``"per_example"`` (exact per-example norms; sharper
            ``tr(Sigma)``, needs layers :class:`autobatch.PerExampleGradNorms` supports).
        seed: seeds the batch order and the model's randomness (dropout) for a repeatable
            result; ``None`` draws a fresh order. The global RNG state is restored either way.
        train: measure in train mode (dropout on, as in training); ``False`` in eval mode.
            Each module's own mode is restored afterwards.

    Returns:
        The estimate, from equally weighted batches.

    Raises:
        ValueError: on a model without trainable parameters, ``batch_size < 2``, a
            ``micro_batch_size`` that does not divide or exceeds ``batch_size``, more batches
            than the data holds, an unknown method, or a non-scalar loss.
        TypeError: if ``data`` is not (input, target) pairs.
    """
    params = trainable_parameters(model)
    source = as_batch_source(data)
    micro, num_batches = _check_sizes(len(source), batch_size, micro_batch_size, num_batches, method)
    device = params[0].device
    modes = [(m, m.training) for m in model.modules()]
    saved_grads = [p.grad for p in params]
    saved_buffers = [b.detach().clone() for b in model.buffers()]  # BatchNorm running stats
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            if seed is not None:
                torch.manual_seed(seed)
            order_gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(62))
            order = torch.randperm(len(source), generator=order_gen)
            model.train(train)
            for p in params:
                p.grad = None
            estimator = _run(model, params, source, loss_fn, order, batch_size, micro, num_batches, method, device)
    finally:
        for module, mode in modes:
            module.training = mode
        for p, g in zip(params, saved_grads):
            p.grad = g
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), saved_buffers):
                buffer.copy_(saved)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return NoiseScaleEstimate(
        noise_scale=estimator.noise_scale,
        grad_sq=estimator.grad_sq,
        trace_cov=estimator.trace_cov,
        noise_scale_stderr=estimator.noise_scale_stderr,
        samples_used=num_batches * batch_size,
        num_batches=num_batches,
        method=method,
        batch_size=batch_size,
        micro_batch_size=micro,
    )


def _check_sizes(
    n: int, batch_size: int, micro: int | None, num_batches: int | None, method: str
) -> tuple[int, int]:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS} (got method={method!r})")
    if batch_size < 2:
        raise ValueError(
            f"batch_size must be >= 2 (got batch_size={batch_size}); the noise scale compares "
            "gradients of smaller batches with the whole batch's"
        )
    if micro is None:
        micro = batch_size if method == "per_example" else _default_micro(batch_size)
    if not 1 <= micro <= batch_size or batch_size % micro:
        raise ValueError(
            f"micro_batch_size must divide batch_size and be at most batch_size (got "
            f"micro_batch_size={micro}, batch_size={batch_size}); e.g. micro_batch_size="
            f"{_default_micro(batch_size)}"
        )
    if method == "micro" and micro == batch_size:
        raise ValueError(
            f"method='micro' needs at least 2 micro-batches per batch (got micro_batch_size="
            f"{micro}, batch_size={batch_size}); use a smaller micro_batch_size"
        )
    if num_batches is None:
        num_batches = n // batch_size
    if num_batches < 1 or num_batches * batch_size > n:
        raise ValueError(
            f"num_batches * batch_size must be between batch_size and the {n} examples of the "
            f"data (got num_batches={num_batches}, batch_size={batch_size}: "
            f"{num_batches * batch_size} examples); batches are disjoint, so use "
            f"num_batches <= {n // batch_size} or more data"
        )
    return micro, num_batches


def _default_micro(batch_size: int) -> int:
    target = max(1, batch_size // 8)
    return max(d for d in range(1, target + 1) if batch_size % d == 0)


def _scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, the loss mean-reduced over the batch (got "
            f"{shape}); use reduction='mean' or call .mean() on per-example losses"
        )
    return loss


def _run(
    model: nn.Module,
    params: list[nn.Parameter],
    source: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    order: torch.Tensor,
    batch_size: int,
    micro: int,
    num_batches: int,
    method: str,
    device: torch.device,
) -> GradientNoiseScale:
    n = len(source)
    # Effective sizes that undo the finite-population correction of drawing without
    # replacement (see the module docstring).
    small = without_replacement_batch_size(micro if method == "micro" else 1, n)
    big = without_replacement_batch_size(batch_size, n)
    estimator = GradientNoiseScale(smoothing=None, min_updates=1)
    k = batch_size // micro
    hooks = MicroBatchGradNorms(model) if method == "micro" else PerExampleGradNorms(model)
    with hooks:
        for step in range(num_batches):
            indices = order[step * batch_size : (step + 1) * batch_size]
            pieces = split_batch(move_to(source.batch(indices), device), [micro] * k)
            smalls: list[torch.Tensor] = []
            if isinstance(hooks, MicroBatchGradNorms):
                hooks.begin_step()
            for inputs, targets in pieces:
                loss = _scalar(loss_fn(model(inputs), targets))
                (loss * (micro / batch_size)).backward()
                if isinstance(hooks, MicroBatchGradNorms):
                    hooks.after_backward(batch_size=micro, loss_weight=micro / batch_size)
                else:
                    smalls.append(hooks.sq_norms(loss_weight=micro / batch_size))
            if isinstance(hooks, MicroBatchGradNorms):
                norms = hooks.end_step()
                assert norms is not None  # k >= 2 was checked
                small_sq, big_sq = norms.small_sq_norms, norms.big_sq_norm
            else:
                # One host sync per batch for the per-example norms and the big norm.
                small_sq = torch.cat(smalls).double().cpu().tolist()
                big_sq = float(grad_sq_norm(params))
            estimator.update(small_sq, small, big_sq, big)
            for p in params:
                p.grad = None
    return estimator
