"""Per-example gradients of tensors that are shared by every example of a batch.

Per-example norms come from a layer's input and its output gradient when the layer sees the
batch along dimension 0. Some gradient-carrying tensors have no batch dimension: parameters
the root module uses directly (a ViT's ``cls_token``, ``pos_embed``), and outputs of layers
called without the batch (``pos_emb(arange(T))``, shape ``(T, D)``, or Hugging Face's
``wpe(position_ids)`` of shape ``(1, T, D)``). They are broadcast over the batch by some op,
and autograd sums their gradient over the examples.

:class:`BroadcastTracker` (a ``TorchFunctionMode`` active for the rest of the measured
forward once such a tensor exists) watches every op that takes one of these *shared*
tensors:

- an op that also takes a batched tensor (``x + pos``) *meets* the batch: its output's
  gradient rows are per-example, and the per-example gradient of the shared input is
  ``vmap(grad)`` of that one op over the batched inputs (a single op is re-run, not the model);
- an op that replicates it along a new batch dimension (``cls_token.expand(B, -1, -1)``)
  meets the batch the same way, by its output's gradient rows;
- any other op (``pos_embed[:, :T]``, ``scale * p``) derives another shared tensor; per-example
  gradients flow back through it by its vector-Jacobian product, vmapped over the examples.

After backward, :meth:`BroadcastTracker.per_example_grads` walks the records in reverse and
returns each source's per-example gradients, shape ``(B, *tensor.shape)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["BroadcastTracker"]

# Ops that copy a shared tensor along a new (or size-1) batch dimension.
_REPLICATE = {torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to, torch.Tensor.repeat}


@dataclass(eq=False)
class _Op:
    """One op that took a shared tensor; ``kind`` is "meet", "replicate" or "derive"."""

    kind: str
    func: Any
    flat: list[Any]  # flattened (args, kwargs), tensors detached
    spec: Any
    shared: list[int]  # positions in ``flat`` of the shared inputs
    in_ids: list[int]  # ids of the live shared inputs
    batched: list[int]  # positions in ``flat`` of the inputs holding the batch
    outputs: list[torch.Tensor]  # detached tensor outputs
    out_ids: list[int]  # ids of the live outputs
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # output position -> gradient

    def call(self, values: dict[int, Any]) -> list[torch.Tensor]:
        flat = [values.get(i, v) for i, v in enumerate(self.flat)]
        args, kwargs = tree_unflatten(flat, self.spec)
        out = self.func(*args, **kwargs)
        return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


class BroadcastTracker(TorchFunctionMode):
    """Tracks shared (batch-free) tensors through one forward; see the module docstring.

    Args:
        batch: the examples in the forward (``B``).
    """

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self._shared: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive: ids stay unique)
        self._ops: list[_Op] = []
        self._paused = False

    # -- registration ---------------------------------------------------------------------------
    def add_source(self, tensor: torch.Tensor) -> None:
        """Track ``tensor`` (a root-owned parameter, or a layer output without the batch)."""
        self._shared[id(tensor)] = tensor

    def is_shared(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and self._shared.get(id(tensor)) is tensor

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run inside are not tracked (the collector's own bookkeeping)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def _batched(self, t: Any) -> bool:
        # Parameters never hold the batch, whatever their size (a width equal to B).
        return (isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == self.batch
                and not self.is_shared(t) and not (t.is_leaf and t.requires_grad))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused or not torch.is_grad_enabled():
            return out
        flat, spec = tree_flatten((args, kwargs))
        shared = [i for i, t in enumerate(flat) if self.is_shared(t) and t.requires_grad]
        if not shared:
            return out
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if not outs:
            return out
        batched = [i for i, t in enumerate(flat) if i not in shared and self._batched(t)]
        if batched:
            kind = "meet"
        elif func in _REPLICATE and all(o.ndim > 0 and o.shape[0] == self.batch for o in outs):
            kind = "replicate"
        else:
            kind = "derive"
        op = _Op(kind, func, [t.detach() if isinstance(t, torch.Tensor) else t for t in flat],
                 spec, shared, [id(flat[i]) for i in shared], batched, [o.detach() for o in outs],
                 [id(o) for o in outs])
        self._ops.append(op)
        for index, o in enumerate(outs):
            if kind == "derive":
                self._shared[id(o)] = o
            with self.paused():
                o.register_hook(self._make_hook(op, index))
        return out

    @staticmethod
    def _make_hook(op: _Op, index: int):
        def hook(g: torch.Tensor) -> None:
            op.grads[index] = g.detach()

        return hook

    # -- after backward -------------------------------------------------------------------------
    def per_example_grads(self) -> dict[int, torch.Tensor]:
        """Per-example gradients of every shared tensor, by ``id``: shape ``(B, *shape)``.

        A "derive" op's outputs are never given gradient rows by its hooks (they hold the sum
        over examples); their rows come from the ops that consume them, processed first.
        """
        b = self.batch
        rows: dict[int, torch.Tensor] = {}

        def add(key: int, g: torch.Tensor) -> None:
            rows[key] = rows[key] + g if key in rows else g

        for op in reversed(self._ops):
            inputs = [op.flat[i] for i in op.shared]
            if op.kind == "derive":
                cotangents = [rows.get(key) for key in op.out_ids]
                if all(c is None for c in cotangents):
                    continue
                cotangents = [torch.zeros(b, *o.shape, dtype=o.dtype, device=o.device) if c is None
                              else c for c, o in zip(cotangents, op.outputs)]

                def f(*values: torch.Tensor, op: _Op = op) -> tuple[torch.Tensor, ...]:
                    return tuple(op.call(dict(zip(op.shared, values))))

                _, pullback = vjp(f, *inputs)
                for key, g in zip(op.in_ids, vmap(pullback)(tuple(cotangents))):
                    add(key, g)
                continue
            grads_out = [op.grads.get(i, torch.zeros_like(o)) for i, o in enumerate(op.outputs)]
            if not op.grads:
                continue
            def contribution(values: list[torch.Tensor], batched_rows: list[torch.Tensor],
                             g_rows: list[torch.Tensor], op: _Op = op) -> torch.Tensor:
                given = dict(zip(op.shared, values))
                given.update({i: r.unsqueeze(0) for i, r in zip(op.batched, batched_rows)})
                outs = op.call(given)
                if op.kind == "replicate":  # every row is the same function of the input
                    outs = [o[:1] for o in outs]
                return sum((o * g.unsqueeze(0)).sum() for o, g in zip(outs, g_rows))

            per_example = vmap(grad(contribution), in_dims=(None, 0, 0))(
                inputs, [op.flat[i] for i in op.batched], grads_out)
            for key, g in zip(op.in_ids, per_example):
                add(key, g)
        return rows
