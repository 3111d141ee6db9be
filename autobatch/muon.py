"""Muon for a model's hidden matrices, AdamW for the rest, as one optimizer ``fit`` can drive.

``torch.optim.Muon`` orthogonalises the update of 2-D parameters only, and is meant for the
hidden layers' weight matrices; embeddings, the output layer, norms and biases are trained
with AdamW (Jordan et al. 2024; the split every Muon user makes). ``fit``, the memory probe
and the studies take one optimizer, so :class:`MuonAdamW` is one: its param groups are the
two optimizers' groups (each marked ``"algorithm": "muon"`` or ``"adamw"``), its state one
dictionary both share, so the LR autobatch sets per group, checkpoints, ``copy_for`` (the
probe's stand-ins, the trials of ``lr="auto"``) and the resume checks work as for any torch
optimizer.

    opt = MuonAdamW(muon_param_groups(model, lr=0.02, adamw_lr=3e-3))
    autobatch.fit(model, data, optimizer=opt, ...)

The LR rule when B changes is the optimizer family's default for non-SGD optimizers, the
square root (Muon's update has a fixed norm per matrix, as Adam's has per coordinate).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["MuonAdamW", "muon_param_groups"]

_ALGORITHMS = {"muon": torch.optim.Muon, "adamw": torch.optim.AdamW}


def muon_param_groups(model: nn.Module, *, lr: float = 0.02, adamw_lr: float = 3e-3, weight_decay: float = 0.0,
                      adamw_weight_decay: float = 0.0, **muon_options: Any) -> list[dict[str, Any]]:
    """The usual split of ``model``'s trainable parameters into a Muon and an AdamW group.

    Muon gets the 2-D parameters inside the model (linear layers' weights, attention's
    stacked input projection); AdamW gets everything else: embeddings, the output layer (the
    last ``nn.Linear`` registered; tied to an embedding, it is that embedding), norms, biases
    and parameters of other shapes (convolutions).

    Args:
        model: the model.
        lr: Muon's LR (the first group's: ``fit(lr=...)`` scales both, keeping the ratio).
        adamw_lr: AdamW's LR.
        weight_decay, adamw_weight_decay: decoupled weight decay of each group.
        **muon_options: other ``torch.optim.Muon`` settings (``momentum``, ``ns_steps``, ...).

    Returns:
        ``[muon_group, adamw_group]`` for :class:`MuonAdamW` (a group with no parameter is
        left out).

    Raises:
        ValueError: for a model with no trainable parameter.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    outside = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if linears:
        outside.add(id(linears[-1].weight))  # the output layer
    trainable = [p for p in model.parameters() if p.requires_grad]
    hidden = {id(p) for p in trainable if p.ndim == 2 and id(p) not in outside}
    if not trainable:
        raise ValueError("the model has no trainable parameter (every requires_grad is False)")
    muon = [p for p in trainable if id(p) in hidden]
    adamw = [p for p in trainable if id(p) not in hidden]
    groups = []
    if muon:
        groups.append({"params": muon, "algorithm": "muon", "lr": lr, "weight_decay": weight_decay, **muon_options})
    if adamw:
        groups.append({"params": adamw, "algorithm": "adamw", "lr": adamw_lr, "weight_decay": adamw_weight_decay})
    return groups


class MuonAdamW(torch.optim.Optimizer):
    """Muon over the groups marked ``"algorithm": "muon"``, AdamW over those marked
    ``"adamw"`` (see :func:`muon_param_groups`), as one optimizer.

    Each group holds its algorithm's hyperparameters (torch's defaults filled in), so the
    instance is rebuilt faithfully from its param groups. ``step`` runs Muon, then AdamW.

    Args:
        params: param group dicts, each with ``"algorithm"`` and ``"lr"``.

    Raises:
        ValueError: for a group without a known ``"algorithm"``, or a Muon group holding a
            parameter that is not 2-D (naming its shape and the fix).
    """

    def __init__(self, params: Iterable[Mapping[str, Any]]) -> None:
        groups = [dict(g) for g in params]
        for i, group in enumerate(groups):
            kind = group.get("algorithm")
            if kind not in _ALGORITHMS:
                raise ValueError(f"param group {i} has algorithm={kind!r}; give 'muon' or 'adamw' for each group "
                                 "(muon_param_groups(model) builds the usual split)")
            bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
            if kind == "muon" and bad:
                raise ValueError(f"Muon updates 2-D matrices only, but param group {i} holds parameters of shapes "
                                 f"{bad}; put them in an 'adamw' group")
        self._inner = {kind: cls([{k: v for k, v in g.items() if k != "algorithm"} for g in groups
                                  if g["algorithm"] == kind]) if any(g["algorithm"] == kind for g in groups) else None
                       for kind, cls in _ALGORITHMS.items()}
        inner_groups = []
        for kind, opt in self._inner.items():
            if opt is not None:
                for group in opt.param_groups:
                    group["algorithm"] = kind
                    inner_groups.append(group)
        super().__init__([{"params": []}], {})  # torch's bookkeeping; the real groups follow
        self.param_groups = inner_groups
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and its one state dictionary."""
        start = 0
        for opt in self._inner.values():
            if opt is not None:
                count = len(opt.param_groups)
                opt.param_groups = self.param_groups[start:start + count]
                opt.state = self.state
                start += count

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Torch's loading (the same format as any optimizer), then the groups and state
        shared with the inner optimizers again."""
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of each algorithm over its groups (a closure is evaluated once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner.values():
            if opt is not None:
                opt.step()
        return loss
