"""One-off measurement of the gradient noise scale at fixed parameters.

:func:`measure_noise_scale` draws ``num_batches`` batches of ``batch_size`` examples, runs
forward and backward on each (as ``batch_size / micro_batch_size`` micro-batches, collated
from their indices as training does), and feeds the small-batch and whole-batch squared
gradient norms to a :class:`autobatch.GradientNoiseScale` with equal weights. Nothing is
stepped; the model comes back exactly as it went in.

Batches are drawn as epochs of training would: each pass over the data is a fresh shuffle,
cut into disjoint batches (the tail shorter than a batch is left out), and as many passes are
made as ``num_batches`` needs. Every batch is therefore a simple random sample without
replacement from the ``N`` examples, which shrinks the variance of a batch mean by
``(N-b)/(N-1)`` and would bias ``|G|^2`` low by ``tr(Sigma)/(N-1)`` (13% for ``B_simple =
256`` and ``N = 2000``). The estimator is fed the effective batch sizes ``b (N-1)/(N-b)``
(:func:`autobatch.noise._effective_batch.without_replacement_batch_size`), which makes both
averages unbiased for the data set's own (population) ``|G|^2`` and ``tr(Sigma)``, exactly,
for every batch of every pass. A DataLoader's own sampler (e.g. ``WeightedRandomSampler``)
draws the passes instead; its draws are taken as independent (no correction).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from autobatch._state import preserved_state
from autobatch.accumulate import LossItems, MicroStep, accumulate_gradients, check_mean_reduced
from autobatch.batch import ForwardLoss, LossFn
from autobatch.data import BatchSource, as_batch_source
from autobatch.noise._effective_batch import without_replacement_batch_size
from autobatch.noise.estimator import GradientNoiseScale
from autobatch.noise.micro_batch import MicroBatchNormCollector, grad_sq_norm, trainable_parameters
from autobatch.noise.per_example import PerExampleNormCollector

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
    loss_fn: LossFn | None = None,
    *,
    batch_size: int,
    micro_batch_size: int | None = None,
    num_batches: int | None = None,
    method: Method = "micro",
    seed: int | None = None,
    train: bool = True,
    forward_loss: ForwardLoss | None = None,
    loss_items: LossItems = "auto",
) -> NoiseScaleEstimate:
    """Measure ``B_simple``, ``|G|^2`` and ``tr(Sigma)`` of ``model`` on ``data``.

    Args:
        model: the model, on the device to measure on; batches are moved to the device of
            its first trainable parameter.
        data: any form of :func:`autobatch.data.as_batch_source` (tuples, dicts, a
            Dataset, a DataLoader whose collate_fn pads each micro-batch).
        loss_fn: the loss by the batch protocol (:mod:`autobatch.batch`), **mean**-reduced
            over what the batch holds; optional for dict batches (the output's ``.loss``).
        batch_size: examples per batch ``B``, at least 2 and at most the data's size.
        micro_batch_size: examples per forward/backward; must divide ``batch_size``. For
            ``method="micro"`` these are the small batches (default: the largest divisor of
            ``batch_size`` not above ``batch_size // 8``, about 8 micro-batches); for
            ``"per_example"`` it only bounds memory (default ``batch_size``).
        num_batches: batches to average (default: one pass over the data). More than one
            pass holds are drawn from further passes, each freshly shuffled.
        method: ``"micro"`` or ``"per_example"`` (exact per-example norms; sharper
            ``tr(Sigma)``, needs layers :class:`autobatch.noise.PerExampleNormCollector`
            supports).
        seed: seeds the batch order and the model's randomness (dropout) for a repeatable
            result; ``None`` draws a fresh order. The global RNG state is restored either way.
        train: measure in train mode (dropout on, as in training); ``False`` in eval mode.
            Each module's own mode is restored afterwards.
        forward_loss: ``forward_loss(model, batch) -> loss`` for batches of other forms.
        loss_items: what each micro-batch's mean loss is over (:mod:`autobatch.accumulate`):
            micro-batches are weighted by it, so each batch's gradient is its mean-loss
            gradient (e.g. the token mean of a padded LM batch). Batch sizes, and the noise
            scale, stay in examples: a batch's token-mean gradient is taken as the mean of its
            examples' gradients, each example's token sum divided by the mean tokens per
            example (exact as the batch grows); multiply by the mean tokens per example for
            the noise scale in tokens.

    Returns:
        The estimate, from equally weighted batches.

    Raises:
        ValueError: on a model without trainable parameters, ``batch_size < 2`` or larger
            than the data, a ``micro_batch_size`` that does not divide or exceeds
            ``batch_size``, ``num_batches < 1``, an unknown method, a non-scalar loss, or a loss summed over the batch
            (:func:`autobatch.accumulate.check_mean_reduced`).
        TypeError: if ``data`` is of no accepted form.
        UnsupportedForPerExample: ``method="per_example"`` on a model it cannot handle.
    """
    params = trainable_parameters(model)
    source = as_batch_source(data, check_items=forward_loss is None)
    micro, num_batches = _check_sizes(_pass_length(source), batch_size, micro_batch_size,
                                      num_batches, method)
    device = params[0].device
    loss_items = check_mean_reduced(model, source, loss_fn=loss_fn, forward_loss=forward_loss, loss_items=loss_items,
                                    device=device, examples=micro)  # a summed loss is refused
    with preserved_state(model, train=train):
        if seed is not None:
            torch.manual_seed(seed)
        base_seed = seed if seed is not None else secrets.randbits(62)
        batches = _batches(source, batch_size, num_batches, base_seed)
        estimator = _run(model, params, source, batches, loss_fn, forward_loss, loss_items,
                         batch_size, micro, method, device)
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


def _pass_length(source: BatchSource) -> int:
    """Examples one pass yields: the data set's, or one epoch of the user's sampler."""
    return len(source) if source.sampler is None else len(source.sampler_order(0))


def _batches(source: BatchSource, batch_size: int, num_batches: int, seed: int) -> Iterator[torch.Tensor]:
    """Index tensors of ``num_batches`` batches: full batches of pass 0, then of pass 1, ...
    each pass a fresh shuffle (or the sampler's epoch ``p``)."""
    gen = torch.Generator().manual_seed(seed)
    drawn, epoch = 0, 0
    while drawn < num_batches:
        if source.sampler is None:
            order = torch.randperm(len(source), generator=gen)
        else:
            order = source.sampler_order(epoch, seed)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            if drawn == num_batches:
                return
            yield order[start : start + batch_size]
            drawn += 1
        epoch += 1


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
    if batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} is larger than one pass over the data ({n} examples); "
            f"use batch_size <= {n} or more data"
        )
    if num_batches is None:
        num_batches = n // batch_size
    if num_batches < 1:
        raise ValueError(
            f"num_batches must be >= 1 (got num_batches={num_batches}); batches beyond one "
            f"pass ({n // batch_size} of batch_size={batch_size}) come from further passes"
        )
    return micro, num_batches


def _default_micro(batch_size: int) -> int:
    target = max(1, batch_size // 8)
    return max(d for d in range(1, target + 1) if batch_size % d == 0)


def _run(
    model: nn.Module,
    params: list[nn.Parameter],
    source: BatchSource,
    batches: Iterator[torch.Tensor],
    loss_fn: LossFn | None,
    forward_loss: ForwardLoss | None,
    loss_items: LossItems,
    batch_size: int,
    micro: int,
    method: str,
    device: torch.device,
) -> GradientNoiseScale:
    # Effective sizes that undo the finite-population correction of drawing without
    # replacement (see the module docstring); a user's sampler is taken as independent draws.
    n = len(source)
    small_b = micro if method == "micro" else 1
    small = small_b if source.sampler is not None else without_replacement_batch_size(small_b, n)
    big = batch_size if source.sampler is not None else without_replacement_batch_size(batch_size, n)
    estimator = GradientNoiseScale(smoothing=None, min_updates=1)
    micro_hooks = MicroBatchNormCollector(model) if method == "micro" else None
    per_example = PerExampleNormCollector(model) if method == "per_example" else None
    smalls: list[torch.Tensor] = []

    def after_backward(m: MicroStep) -> None:
        if micro_hooks is not None:
            # The collector's sizes are in loss items (its weights must be proportional to
            # them); the estimator below gets example counts (see the loss_items argument).
            micro_hooks.after_backward(batch_size=m.items, loss_weight=m.weight)
        else:
            smalls.append(per_example.sq_norms(loss_weight=m.weight))

    try:
        for indices in batches:
            smalls.clear()
            if micro_hooks is not None:
                micro_hooks.begin_step()
            accumulate_gradients(
                model, (source.batch(chunk) for chunk in indices.split(micro)), loss_fn=loss_fn,
                forward_loss=forward_loss, loss_items=loss_items, step_examples=batch_size,
                device=device, after_backward=after_backward)
            if micro_hooks is not None:
                norms = micro_hooks.end_step()
                if norms is None:  # fewer than 2 micro-batches had a loss item
                    raise ValueError(
                        f"a batch of {batch_size} examples had fewer than 2 micro-batches with "
                        "a loss item (all targets -100?); use a larger batch_size"
                    )
                small_sq, big_sq = norms.small_sq_norms, norms.big_sq_norm
            else:
                # One host sync per batch for the per-example norms and the big norm.
                small_sq = torch.cat(smalls).double().cpu().tolist()
                big_sq = float(grad_sq_norm(params))
            estimator.update(small_sq, small, big_sq, big)
            for p in params:
                p.grad = None
    finally:
        for hooks in (micro_hooks, per_example):
            if hooks is not None:
                hooks.remove()
    return estimator
