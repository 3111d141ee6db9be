"""Squared gradient norms of a process's micro-batches under FSDP2 sharding, read from the
reduce-scatter FSDP runs anyway (no extra pass, no extra collective).

Under ``torch.distributed.fsdp.fully_shard`` a parameter is a ``DTensor`` shard; backward
computes the *unsharded* gradient of this process's micro-batch, and FSDP reduce-scatters it
(summed over processes, each keeping its shard). A parameter hook on the shard never sees that
local gradient, but the reduce-scatter's input is exactly it: one flat tensor per FSDP unit,
the unit's parameters' local gradients concatenated (with zero padding for the shards'
alignment, which adds nothing to a norm). :class:`ReduceScatterNormCollector` wraps each
unit's reduce-scatter communication object (``FSDPModule.set_custom_reduce_scatter``) and
adds the squared norm of that input, per micro-batch, on the device. Summed over the units it
is ``|w_i s G_{b_i}|^2``, the squared norm of this process's micro-batch gradient (loss weight
``w_i`` and AMP scale ``s`` still in), the small-batch input of
:class:`autobatch.noise.estimator.GradientNoiseScale`, as
:class:`~autobatch.noise.micro_batch.MicroBatchNormCollector` gives it without sharding.

Conventions:

- The reduce-scatter must run after every micro-batch (``set_requires_gradient_sync(True)``,
  FSDP's default). With the sync deferred to the step's last micro-batch, its input is the sum
  of the process's micro-batches: then call :meth:`~ReduceScatterNormCollector.after_backward`
  once, for the whole share.
- FSDP may divide the input before reducing (a reduce dtype with overflow risk, such as fp16,
  divides by about ``sqrt(N)`` first); the collector multiplies that factor back.
- A shard group of one process runs no reduce-scatter (FSDP copies instead): nothing is seen.

FSDP2's communication hooks are private API in torch 2.13
(``torch.distributed.fsdp._fully_shard``): the collector checks what it uses when it is made
and fails with a clear error where a torch release moved it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["ReduceScatterNormCollector", "fsdp_units"]


def fsdp_units(model: nn.Module) -> list[Any]:
    """The FSDP2 modules of ``model`` that own parameters (each ``fully_shard`` call made one),
    outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule) and _param_groups(m)]


def _param_groups(module: Any) -> list[Any]:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch releases with one param group per module
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return [g for g in groups if g is not None and g.fsdp_params]


class _NormReduceScatter:
    """A unit's reduce-scatter, measured: delegates to the communication object it replaces."""

    def __init__(self, owner: ReduceScatterNormCollector, group: Any) -> None:
        self.owner, self.group, self.inner = owner, group, group._reduce_scatter_comm

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                 async_op: bool = False) -> Any:
        if self.owner.active:
            # The input is on the reduce-scatter stream here, before the collective overwrites
            # nothing of it (the output is a separate buffer); one reduction, no host sync.
            sq = torch.linalg.vector_norm(input_tensor, dtype=torch.float32).square()
            pre = self.owner.predivide(self.group, group, input_tensor.dtype)
            self.owner.pending.append(sq * (pre * pre) if pre != 1.0 else sq)
        return self.inner(output_tensor, input_tensor, group, op, async_op)


class ReduceScatterNormCollector:
    """Per-micro-batch squared norms of this process's local gradient under FSDP2 (module
    docstring), with :class:`~autobatch.noise.micro_batch.MicroBatchNormCollector`'s step
    interface: :meth:`begin_step`, :meth:`after_backward` per micro-batch, :meth:`finish_step`.

    Args:
        model: a model sharded with ``fully_shard`` (at least one unit with parameters).

    Raises:
        ValueError: if ``model`` has no FSDP2 unit with parameters.
        RuntimeError: if this torch release lacks the FSDP2 internals the collector reads.
    """

    def __init__(self, model: nn.Module) -> None:
        units = fsdp_units(model)
        if not units:
            raise ValueError(f"{type(model).__name__} has no module sharded with fully_shard that owns parameters")
        try:
            from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors
            from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo
        except ImportError as err:  # pragma: no cover - depends on the torch release
            raise RuntimeError(
                f"this torch release ({torch.__version__}) lacks the FSDP2 internals the noise-scale measurement "
                f"under sharding reads ({err}); use gns_method='off' with policy 'fixed' or 'ramp'"
            ) from err
        self._divide_factors, self._ddp_mesh = _get_gradient_divide_factors, DDPMeshInfo
        self.active = False
        self.pending: list[torch.Tensor] = []
        self._micro_sq: list[torch.Tensor] = []
        self._weights: list[float] = []
        self._device = next(model.parameters()).device
        self._installed: list[tuple[Any, Any]] = []  # (param group, the comm it had)
        for unit in units:
            for group in _param_groups(unit):
                self._installed.append((group, group._reduce_scatter_comm))
                group._reduce_scatter_comm = _NormReduceScatter(self, group)

    def predivide(self, param_group: Any, reduce_scatter_group: Any, reduce_dtype: torch.dtype) -> float:
        """The factor FSDP divided the reduce-scatter input by (1.0 for fp32/bf16 reductions)."""
        all_reduce_group = (param_group._all_reduce_process_group
                            if isinstance(param_group.mesh_info, self._ddp_mesh) else None)
        pre, *_ = self._divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, param_group.device.type,
                                       param_group.gradient_divide_factor,
                                       getattr(param_group, "force_sum_reduction_for_comms", False))
        return float(pre) if pre else 1.0

    def begin_step(self) -> None:
        """Start a step: measure the reduce-scatters from now on."""
        self.active = True
        self.pending, self._micro_sq, self._weights = [], [], []

    def after_backward(self, batch_size: int, loss_weight: float = 1.0) -> None:
        """Close one micro-batch (or, with the sync deferred to the step's end, the process's
        whole share): what the reduce-scatters saw since the last call.

        Args:
            batch_size: its examples (or loss items), kept for the caller.
            loss_weight: the factor its mean loss was multiplied by before backward.
        """
        if not (math.isfinite(loss_weight) and loss_weight > 0):
            raise ValueError(f"loss_weight must be positive and finite (got loss_weight={loss_weight})")
        raw = torch.stack(self.pending).sum() if self.pending else torch.zeros((), device=self._device)
        self._micro_sq.append(raw)
        self._weights.append(float(loss_weight))
        self.pending = []

    def discard(self) -> None:
        """Forget what the reduce-scatters saw since the last :meth:`after_backward` (a pass
        that only keeps the processes' collectives in step)."""
        self.pending = []

    def finish_step(self) -> torch.Tensor:
        """Stop measuring and return ``|w_i s G_{b_i}|^2`` of every closed micro-batch, a float32
        tensor on the device (their loss weights stay in :attr:`loss_weights`)."""
        self.active = False
        self.pending = []
        if not self._micro_sq:
            return torch.zeros(0, dtype=torch.float32, device=self._device)
        return torch.stack(self._micro_sq)

    @property
    def loss_weights(self) -> list[float]:
        """The ``loss_weight`` of each micro-batch closed in the current (or last) step."""
        return self._weights

    def remove(self) -> None:
        """Put every unit's own reduce-scatter back; the collector measures nothing afterwards."""
        for group, comm in self._installed:
            group._reduce_scatter_comm = comm
        self._installed, self.active = [], False
