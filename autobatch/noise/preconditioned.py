"""The gradient noise scale in an adaptive optimizer's geometry (Adam-family).

Adam steps along ``P g`` with the diagonal preconditioner ``P = diag(1 / (sqrt(v_hat) +
eps))``, so the noise that matters to it is that of the preconditioned gradients ``P g_i``:

    B_simple(P) = tr(P Sigma P) / |P G|^2,

the noise scale AdaptDL/Pollux measures for Adam (Qiao et al. 2021) and the reason Adam's
critical batch is larger than SGD's (Zhang et al. 2019, noisy quadratic model). The
two-batch estimator needs nothing new: it takes squared norms, and ``|P G_b|^2`` is the
squared norm of ``G_b`` weighted element-wise by ``P``. So this module only supplies the
weights (:func:`adam_preconditioner`) and a collector (:class:`PreconditionedNormCollector`) that
weights the norms it reads; its output feeds :class:`~autobatch.GradientNoiseScale` exactly
as :class:`~autobatch.noise.MicroBatchNormCollector`'s does.

Conventions: ``v_hat = exp_avg_sq / (1 - beta2^t)`` as torch's Adam/AdamW compute it (no
``amsgrad``); the weights are read at :meth:`PreconditionedNormCollector.begin_step`, i.e. the
preconditioner of the previous optimizer step, which is what this step's update will (almost)
use. Parameters without optimizer state yet (before the first step) get weight 1.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from autobatch.noise.micro_batch import (
    LossReduction,
    MicroBatchNormCollector,
    StepGradNorms,
)

__all__ = ["PreconditionedNormCollector", "adam_preconditioner", "weighted_grad_sq_norm", "weighted_sq_norm"]


def adam_preconditioner(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, torch.Tensor]:
    """``1 / (sqrt(v_hat) + eps)`` per parameter, from an Adam-family optimizer's state.

    Reads ``exp_avg_sq`` and ``step`` of each parameter and ``betas``/``eps`` of its group
    (torch's Adam, AdamW, NAdam, RAdam name them so). Parameters without that state are left
    out (weight 1 in :func:`weighted_sq_norm`).

    Returns:
        parameter -> weight tensor of the parameter's shape (detached, float32).
    """
    weights: dict[torch.Tensor, torch.Tensor] = {}
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state or "step" not in state:
                continue
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].float() / (1.0 - beta2**step)
            weights[p] = 1.0 / (v_hat.sqrt() + eps)
    return weights


def weighted_sq_norm(grad: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``|weight * grad|^2`` as a float32 0-d tensor (``|grad|^2`` when ``weight`` is None)."""
    g = grad.float() if weight is None else grad.float() * weight
    return torch.linalg.vector_norm(g, dtype=torch.float32).square()


def weighted_grad_sq_norm(params: list[torch.Tensor], weights: Mapping[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``sum_p |w_p * p.grad|^2`` over the parameters that have a gradient, as a float32 0-d
    tensor on their device (no host sync); a parameter ``weights`` leaves out has weight 1."""
    sq = [weighted_sq_norm(p.grad, weights.get(p)) for p in params if p.grad is not None]
    if not sq:
        return torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    return torch.stack(sq).sum()


class PreconditionedNormCollector(MicroBatchNormCollector):
    """:class:`~autobatch.noise.MicroBatchNormCollector` with every norm taken in a diagonal
    preconditioner's geometry: ``|P G_b|^2`` and ``|P G_B|^2`` instead of ``|G_b|^2``, ``|G_B|^2``.

    Args:
        model: the module whose trainable parameters are measured.
        preconditioner: called at every :meth:`begin_step`; returns parameter -> weight
            tensor (e.g. ``functools.partial(adam_preconditioner, optimizer)``). A parameter it
            leaves out has weight 1.
        loss_reduction: as for :class:`~autobatch.noise.MicroBatchNormCollector`.
    """

    def __init__(
        self,
        model: nn.Module,
        preconditioner: functools.partial[Mapping[torch.Tensor, torch.Tensor]] | object,
        loss_reduction: LossReduction = "mean",
    ) -> None:
        super().__init__(model, loss_reduction)
        for handle in self._handles:  # the parent's unweighted hooks
            handle.remove()
        self._handles = [p.register_hook(functools.partial(self._on_weighted_grad, p)) for p in self._params]
        self._preconditioner = preconditioner
        self._weights_now: Mapping[torch.Tensor, torch.Tensor] = {}

    def _on_weighted_grad(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        if self._active:
            # The parent squares and sums what _pending holds: store the weighted norm.
            self._pending.append(weighted_sq_norm(grad, self._weights_now.get(param)).sqrt())

    def begin_step(self) -> None:
        """Start a step and read the preconditioner's current weights."""
        self._weights_now = self._preconditioner()  # type: ignore[operator]
        super().begin_step()

    def end_step(
        self, grad_scale: float = 1.0, *, min_micro_batches: int = 2, big_norm: bool = True
    ) -> StepGradNorms | None:
        """As :meth:`MicroBatchNormCollector.end_step`, with ``|P G_B|^2`` read from ``.grad``."""
        weights, sizes = list(self._weights), list(self._sizes)
        norms = super().end_step(grad_scale, min_micro_batches=min_micro_batches, big_norm=False)
        if norms is None or not big_norm:
            return norms
        per_mean = [w * (b if self.loss_reduction == "sum" else 1) for w, b in zip(weights, sizes)]
        total = sum(per_mean)  # .grad = grad_scale * total * G_B
        big = sum(float(weighted_sq_norm(p.grad, self._weights_now.get(p))) for p in self._params
                  if p.grad is not None)
        return StepGradNorms(norms.small_sq_norms, norms.small_batch_size, big / (total * grad_scale) ** 2,
                             norms.big_batch_size, norms.micro_batch_sizes)
