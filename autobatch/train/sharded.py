"""FSDP2 in ``autobatch.fit``: a model the user sharded with ``fully_shard`` (FSDP, or HSDP on
a 2-D mesh), detected, checked, and driven through the same loop as one process or DDP.

What changes from DDP (see :mod:`autobatch.train.distributed`):

- The model is not wrapped and its parameters are not broadcast: the sharded initialisation is
  the user's. Every process runs the same number of forward/backward passes per step (FSDP
  all-gathers in each forward and reduce-scatters in each backward, so the processes'
  collectives must match): the step's micro-batch count comes from the largest share, and a
  process with fewer examples runs zero-weight passes (:func:`autobatch.train.step.forward_backward`).
- FSDP averages the reduced gradient over the data-parallel processes; the loop's loss weights
  are fractions of the *global* step (``items_i / N``), so they are multiplied by the number of
  those processes (:attr:`ShardedLayout.data_parallel`): the average is then the step's
  mean-loss gradient, token-exact with uneven shares.
- Gradient sync during accumulation (``reduce``): ``"micro_batch"`` (default) reduce-scatters
  after every micro-batch, so a process holds only gradient shards between micro-batches
  (FSDP's memory saving intact; the communication grows with the micro-batch count, as
  OLMo-core does it); ``"step"`` defers the reduce-scatter to the last micro-batch
  (``set_requires_gradient_sync(False)`` before), one reduce-scatter per step but the whole
  unsharded gradient held in between (docs/benchmarks/fsdp_overhead.md measures both).
- The noise scale's small batches are this process's micro-batches (or, with ``reduce="step"``,
  its whole share), read from the reduce-scatter's input
  (:class:`autobatch.noise.sharded.ReduceScatterNormCollector`); the step's ``|G_B|^2`` is the
  sum of the gradient shards' squared norms over every process (one number in the step's
  all-reduce), divided by :attr:`ShardedLayout.replicate` under HSDP, where each shard is held
  that many times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from autobatch.train.distributed import DistInfo

__all__ = ["ShardedLayout", "clip_sharded_gradients", "set_gradient_sync", "shard_sq_norm", "sharded_layout"]

Reduce = Literal["micro_batch", "step"]
REDUCE_MODES: tuple[str, ...] = ("micro_batch", "step")


@dataclass(frozen=True)
class ShardedLayout:
    """How an FSDP2 model is laid out over the processes.

    Attributes:
        data_parallel: processes the gradient is reduced over (the mesh's size).
        replicate: processes that hold each shard (HSDP's replicate dimension; 1 for FSDP).
        reduce: when gradients are reduce-scattered during accumulation (module docstring).
        units: the FSDP modules that own parameters, outermost first.
    """

    data_parallel: int
    replicate: int
    reduce: Reduce
    units: tuple[nn.Module, ...]


def sharded_layout(model: nn.Module, info: DistInfo, device: torch.device, reduce: Reduce = "micro_batch",
                   ) -> ShardedLayout | None:
    """The model's FSDP2 layout, or None for a model whose parameters are not sharded.

    Raises:
        ValueError: for a model partly sharded (some trainable parameters plain tensors, some
            DTensors), parameters on different meshes, a mesh that does not span the process
            group, a mesh on another device type than ``device``, or an unknown ``reduce``;
            each message names the fix.
    """
    from torch.distributed.tensor import DTensor, Replicate

    from autobatch.noise.sharded import fsdp_units

    params = [p for p in model.parameters() if p.requires_grad]
    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return None
    if reduce not in REDUCE_MODES:
        raise ValueError(f"fsdp_reduce must be one of {REDUCE_MODES} (got fsdp_reduce={reduce!r})")
    if len(sharded) != len(params):
        raise ValueError(
            f"the model is partly sharded: {len(sharded)} of its {len(params)} trainable parameters are DTensors "
            "(fully_shard) and the rest plain tensors, which no gradient sync covers; call fully_shard on the root "
            "module too (after its blocks), so that every parameter belongs to an FSDP unit"
        )
    meshes = []  # DeviceMesh compares by its ranks and dimension names, not by identity
    for p in sharded:
        if p.device_mesh not in meshes:
            meshes.append(p.device_mesh)
    if len(meshes) > 1:
        raise ValueError(f"the model's parameters live on {len(meshes)} device meshes; autobatch.fit needs one "
                         "mesh for the whole model (shard every block and the root on the same mesh)")
    mesh = meshes[0]
    if mesh.size() != info.world_size:
        raise ValueError(
            f"the model is sharded on a mesh of {mesh.size()} processes but the process group has {info.world_size}; "
            "autobatch.fit runs data parallel over the whole group: build the mesh over every process "
            "(init_device_mesh(device_type, (world_size,)) for FSDP, or (replicas, shards) with their product the "
            "world size for HSDP)"
        )
    if mesh.device_type != device.type:
        raise ValueError(f"the model is sharded on a {mesh.device_type} mesh but fit trains on device={device}; "
                         f"pass device='{mesh.device_type}' (or None) or shard on a {device.type} mesh")
    placements = sharded[0].placements
    replicate = math.prod(mesh.size(dim) for dim, p in enumerate(placements) if isinstance(p, Replicate))
    return ShardedLayout(data_parallel=mesh.size(), replicate=replicate, reduce=reduce,
                         units=tuple(fsdp_units(model)))


def set_gradient_sync(layout: ShardedLayout, enabled: bool) -> None:
    """Reduce-scatter gradients after the next backward (True, FSDP's default) or hold them
    unsharded until a backward with it on."""
    for unit in layout.units:
        unit.set_requires_gradient_sync(enabled, recurse=False)


def shard_sq_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Sum of the squared norms of this process's gradient shards (float32 0-d tensor on the
    device, no host sync): summed over every process and divided by the replicate degree, the
    step's ``|G_B|^2``."""
    grads = [p.grad.to_local() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=params[0].device)
    return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()


def clip_sharded_gradients(params: list[nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale every gradient shard so that the global gradient's norm (``total_norm``, over all
    shards, as the step's norms read it) is at most ``max_norm``: what
    ``torch.nn.utils.clip_grad_norm_`` does, without a second reduction."""
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)  # a DTensor: each process scales its own shard
