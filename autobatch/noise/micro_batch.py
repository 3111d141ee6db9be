"""Squared gradient norms of every micro-batch of a step, collected during the step's own
backward passes (no extra backward, no copy of the gradients).

One optimizer step made of ``k >= 2`` micro-batches already computes ``k`` small-batch
gradients: each backward adds one into ``.grad``. A tensor hook on every trainable leaf
parameter (``param.register_hook``) sees that backward's gradient *before* it is accumulated,
so its squared norm can be summed on the device at the cost of one reduction per parameter.
The accumulated ``.grad`` at the end of the step is the big-batch gradient. These are the two
inputs of :meth:`autobatch.GradientNoiseScale.update`.

Conventions (they decide every number below):

- Norms are those of the gradient of a **mean-reduced** loss over the micro-batch (``b_i``
  examples) and over the whole step (``B = sum b_i`` examples). With ``loss_reduction="sum"``
  the collector divides the measured norms by the batch size squared to get there.
- The loss of micro-batch ``i`` may be multiplied by a weight before ``backward`` (usually
  ``b_i / B``, so that ``.grad`` ends up as the mean over the step) and by an AMP loss scale;
  both are divided out, so norms are of unscaled gradients. The big norm is read from
  ``.grad``: call :meth:`MicroBatchNormCollector.end_step` before ``scaler.unscale_`` and before
  gradient clipping, which would change ``.grad`` in place.
- Everything is per process: under data parallelism each rank's collector reports its local
  micro-batches (or its whole local gradient can serve as one small batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from autobatch.noise._effective_batch import harmonic_batch_size

__all__ = ["MicroBatchNormCollector", "StepGradNorms", "grad_sq_norm", "trainable_parameters"]

LossReduction = Literal["mean", "sum"]
_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class StepGradNorms:
    """One optimizer step's squared gradient norms, all of mean-reduced, unscaled losses.

    Attributes:
        small_sq_norms: ``|G_{b_i}|^2`` of each micro-batch gradient, in step order.
        small_batch_size: the effective small batch ``b = 1/mean(1/b_i)`` (equal to ``b_i``
            when all micro-batches have the same size); with it the mean of
            ``small_sq_norms`` is an exact two-batch input even for unequal sizes.
        big_sq_norm: ``|G_B|^2`` of the whole step's gradient.
        big_batch_size: ``B``, examples in the step (sum of the micro-batch sizes).
        micro_batch_sizes: the ``b_i``.
    """

    small_sq_norms: list[float]
    small_batch_size: float
    big_sq_norm: float
    big_batch_size: int
    micro_batch_sizes: list[int]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require a gradient, each once.

    Raises:
        ValueError: if there is none.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"model has no trainable parameters ({type(model).__name__} has "
            f"{sum(1 for _ in model.parameters())} parameters, none with requires_grad=True); "
            "unfreeze at least one parameter"
        )
    return params


def grad_sq_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squared L2 norms of the ``.grad`` of ``params`` (those without one are skipped),
    as a float32 0-d tensor on the gradients' device; no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    if _small_float32(grads):
        return _flat_sq_norm(grads)
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    return torch.stack(norms).square().sum()


_SMALL_MODEL = 100_000  # parameters


def _small_float32(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` are few enough elements, all float32, for :func:`_flat_sq_norm`."""
    return sum(t.numel() for t in tensors) <= _SMALL_MODEL and all(t.dtype == torch.float32 for t in tensors)


def _flat_sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """A small model's squared gradient norm: its gradients are cheaper copied into one vector
    than reduced one by one (2 kernels instead of 2 per tensor: ~17 vs ~35 us for the MNIST-1D
    CNN on CPU)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    return torch.dot(flat, flat)


def grad_sq_norm_of(params: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """:func:`grad_sq_norm` of a fixed parameter list, with its per-call checks (model size,
    dtypes) done once: a loop reading the norm every step of a small model spends more on
    those checks than on the two kernels."""
    flat = _small_float32(params)

    def norm() -> torch.Tensor:
        if flat:
            try:
                return _flat_sq_norm([p.grad for p in params])  # type: ignore[misc]
            except AttributeError:  # a parameter without a gradient this step
                pass
        return grad_sq_norm(params)

    return norm


class MicroBatchNormCollector:
    """Collect per-micro-batch and whole-step squared gradient norms with parameter hooks.

    Use it inside a gradient-accumulation step::

        collector = MicroBatchNormCollector(model)
        optimizer.zero_grad(set_to_none=True)
        collector.begin_step()
        for x, y in micro_batches:                        # sizes b_i, sum B
            loss = loss_fn(model(x), y)                   # mean over the micro-batch
            (loss * (len(x) / B)).backward()
            collector.after_backward(batch_size=len(x), loss_weight=len(x) / B)
        norms = collector.end_step()                      # before unscale_ / clipping
        if norms is not None:
            gns.update(norms.small_sq_norms, norms.small_batch_size,
                       norms.big_sq_norm, norms.big_batch_size)
        optimizer.step()

    The device work per micro-batch is one norm per parameter tensor; the only host sync is in
    :meth:`end_step`. Hooks are on the parameters that require a gradient when the collector
    is made; frozen parameters and parameters that get no gradient in a step are left out.
    ``.grad`` must be empty (``None`` or zero) at :meth:`begin_step`, else the big norm
    includes whatever was left there.

    Args:
        model: the module whose trainable parameters are measured.
        loss_reduction: ``"mean"`` if each micro-batch loss is a mean over its examples (the
            default), ``"sum"`` if it is a sum; sum-reduced norms are divided by ``b_i^2`` (and
            the big one by ``B^2``) to report mean-reduced ones.

    Raises:
        ValueError: if the model has no trainable parameter or ``loss_reduction`` is unknown.
    """

    def __init__(self, model: nn.Module, loss_reduction: LossReduction = "mean") -> None:
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {_REDUCTIONS} (got loss_reduction={loss_reduction!r})"
            )
        self.loss_reduction = loss_reduction
        self._params = trainable_parameters(model)
        self._handles = [p.register_hook(self._on_grad) for p in self._params]
        self._active = False
        self._pending: list[torch.Tensor] = []  # this backward's per-parameter norms
        self._micro_sq: list[torch.Tensor] = []  # raw squared norm of each micro-batch
        self._sizes: list[int] = []
        self._weights: list[float] = []

    # -- hooks -------------------------------------------------------------------------------
    def _on_grad(self, grad: torch.Tensor) -> None:
        if self._active:
            # The gradient of this backward only, before AccumulateGrad adds it to .grad.
            self._pending.append(torch.linalg.vector_norm(grad, dtype=torch.float32))

    # -- the step ----------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Start a step (call after ``zero_grad``); forgets any unfinished step."""
        self._active = True
        self._pending, self._micro_sq, self._sizes, self._weights = [], [], [], []

    def after_backward(self, batch_size: int, loss_weight: float = 1.0) -> None:
        """Close one micro-batch: its backward has just run.

        Args:
            batch_size: ``b_i``, examples in this micro-batch.
            loss_weight: the factor the micro-batch loss was multiplied by before
                ``backward`` (``b_i / B`` for a mean over the whole step; an AMP scale is
                passed to :meth:`end_step` instead).

        Raises:
            RuntimeError: if :meth:`begin_step` was not called.
            ValueError: if ``batch_size < 1`` or ``loss_weight`` is not positive and finite.
        """
        if not self._active:
            raise RuntimeError("after_backward called outside a step; call begin_step() first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got batch_size={batch_size})")
        if not (math.isfinite(loss_weight) and loss_weight > 0):
            raise ValueError(
                f"loss_weight must be positive and finite (got loss_weight={loss_weight}); it is "
                "the factor the micro-batch loss was multiplied by before backward"
            )
        if self._pending:
            raw = torch.stack(self._pending).square().sum()
        else:  # the loss did not reach any trainable parameter
            raw = torch.zeros((), dtype=torch.float32)
        self._micro_sq.append(raw)
        self._pending = []
        self._sizes.append(int(batch_size))
        self._weights.append(float(loss_weight))

    def end_step(
        self, grad_scale: float = 1.0, *, min_micro_batches: int = 2, big_norm: bool = True
    ) -> StepGradNorms | None:
        """Finish the step and return its norms (one host sync); ``None`` with fewer than
        ``min_micro_batches`` micro-batches (with one, no small batch is smaller than the step).

        Args:
            grad_scale: the AMP loss scale the losses were multiplied by (``scaler.get_scale()``);
                every norm is divided by its square. Call this before ``scaler.unscale_``
                and before clipping.
            min_micro_batches: fewest micro-batches that give a result. Data-parallel training
                passes 1: every rank's local gradient is then one small batch of the global step.
            big_norm: read ``|G_B|^2`` from ``.grad`` (one pass over the gradients); False
                leaves ``big_sq_norm`` NaN, for callers that measure the big gradient
                elsewhere (data-parallel training reads it after the all-reduce).

        Raises:
            RuntimeError: if :meth:`begin_step` was not called, or a backward ran after the
                last :meth:`after_backward`.
            ValueError: if ``grad_scale`` is not positive, or the loss weights are not
                proportional to the micro-batch sizes (then ``.grad`` is not the gradient of
                the step's mean loss).
        """
        raw = self.finish_step()
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be positive and finite (got grad_scale={grad_scale})")
        if len(self._sizes) < max(1, min_micro_batches):
            return None
        big_batch = sum(self._sizes)
        # Weight of each micro-batch's *mean-loss* gradient inside .grad.
        per_mean = [
            w * (b if self.loss_reduction == "sum" else 1) for w, b in zip(self._weights, self._sizes)
        ]
        _check_proportional(per_mean, self._sizes)
        total = sum(per_mean)  # .grad = grad_scale * total * G_B
        device = raw.device
        big = grad_sq_norm(self._params).to(device) if big_norm else torch.full((), math.nan, device=device)
        values = torch.cat([raw, big.reshape(1)]).double().cpu().tolist()  # the step's one host sync
        smalls = [v / (u * grad_scale) ** 2 for v, u in zip(values[:-1], per_mean)]
        return StepGradNorms(
            small_sq_norms=smalls,
            small_batch_size=harmonic_batch_size(self._sizes),
            big_sq_norm=values[-1] / (total * grad_scale) ** 2,
            big_batch_size=big_batch,
            micro_batch_sizes=list(self._sizes),
        )

    def finish_step(self) -> torch.Tensor:
        """Close the step without a host sync and return what the hooks measured.

        For loops that read the norms together with other numbers in one transfer:
        :meth:`end_step` is this plus the division by the loss weights and the AMP scale.

        Returns:
            ``|w_i s G_{b_i}|^2`` of every micro-batch, as the backward saw it (the loss
            weight ``w_i`` and the AMP scale ``s`` still in): a float32 tensor of shape
            ``(k,)`` on the gradients' device, ``k`` the number of :meth:`after_backward`
            calls (their loss weights stay in :attr:`loss_weights`).

        Raises:
            RuntimeError: if :meth:`begin_step` was not called, or a backward ran after the
                last :meth:`after_backward`.
        """
        if not self._active:
            raise RuntimeError("end_step/finish_step called outside a step; call begin_step() first")
        self._active = False
        if self._pending:
            raise RuntimeError(
                f"{len(self._pending)} parameter gradients arrived after the last after_backward();"
                " call after_backward(batch_size, loss_weight) after every micro-batch backward"
            )
        if not self._micro_sq:
            return torch.zeros(0, dtype=torch.float32, device=self._params[0].device)
        return torch.stack(self._micro_sq)

    @property
    def loss_weights(self) -> list[float]:
        """The ``loss_weight`` of each micro-batch closed in the current (or last) step."""
        return self._weights

    # -- lifetime ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the hooks; the collector records nothing afterwards."""
        for handle in self._handles:
            handle.remove()
        for p in self._params if self._handles else ():
            # A removed hook leaves an empty dict that autograd still calls into on every
            # backward (~1 us per parameter); with no hook of anyone else left, drop it.
            if p._backward_hooks is not None and not p._backward_hooks:
                p._backward_hooks = None
        self._handles = []
        self._active = False

    def __enter__(self) -> MicroBatchNormCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _check_proportional(weights: list[float], sizes: list[int]) -> None:
    """The accumulated gradient is ``sum_i w_i G_i``; it is a multiple of the step's mean
    gradient ``sum_i (b_i/B) G_i`` only if ``w_i`` is proportional to ``b_i``."""
    ratios = [w / b for w, b in zip(weights, sizes)]
    if max(ratios) - min(ratios) > 1e-6 * max(ratios):
        raise ValueError(
            "micro-batch loss weights must be proportional to the micro-batch sizes so that "
            f".grad is the gradient of the step's mean loss (got mean-loss weights {weights} "
            f"for sizes {sizes}); multiply each mean loss by b_i / B"
        )
