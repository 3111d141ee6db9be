"""autobatch.optimizers: the optimizer spec (class, factory, partial, instance) and faithful
copies of an instance for the probe."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from autobatch.optimizers import build_optimizer, copy_for


def test_optimizer_specs_class_factory_partial_and_instance() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    params = list(model.parameters())
    opt = build_optimizer(torch.optim.SGD, params, lr=0.3)
    assert opt.param_groups[0]["lr"] == 0.3 and len(opt.param_groups[0]["params"]) == 2  # trainable only
    held = build_optimizer(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), params)
    assert (held.param_groups[0]["lr"], held.param_groups[0]["momentum"]) == (0.1, 0.9)
    over = build_optimizer(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), params, lr=0.5)
    assert (over.param_groups[0]["lr"], over.param_groups[0]["momentum"]) == (0.5, 0.9)
    no_lr = build_optimizer(lambda ps: torch.optim.Adam(ps, lr=1e-2), params, lr=2e-3)
    assert no_lr.param_groups[0]["lr"] == 2e-3
    positional = build_optimizer(lambda ps, lr: torch.optim.SGD(ps, lr=lr), params, lr=0.7)
    assert positional.param_groups[0]["lr"] == 0.7
    instance = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert build_optimizer(instance, params, lr=5e-4) is instance and instance.param_groups[0]["lr"] == 5e-4
    with pytest.raises(ValueError, match=r"lr is required with an optimizer class \(SGD\).*functools.partial"):
        build_optimizer(torch.optim.SGD, params)
    with pytest.raises(ValueError, match="lr is required: the optimizer factory"):
        build_optimizer(lambda ps, lr: torch.optim.SGD(ps, lr=lr), params)
    with pytest.raises(ValueError, match=r"lr must be > 0 \(got lr=0\)"):
        build_optimizer(torch.optim.SGD, params, lr=0)
    with pytest.raises(ValueError, match="holds tensors that are not the model's parameters"):
        build_optimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), params)


def test_an_instance_is_copied_faithfully_per_param_group() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    decay, no_decay = list(model[0].parameters()), list(model[1].parameters())
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                               {"params": no_decay, "weight_decay": 0.0, "lr": 1e-4}],
                              lr=3e-4, betas=(0.8, 0.95), amsgrad=True)
    with pytest.raises(TypeError, match="decoupled_weight_decay"):  # the old rebuild
        type(adamw)(list(model.parameters()), **adamw.defaults)
    stand_ins = {p: p.detach().clone().requires_grad_() for p in model.parameters()}
    copy = copy_for(adamw, stand_ins)
    assert type(copy) is torch.optim.AdamW and not copy.state
    for ours, theirs in zip(copy.param_groups, adamw.param_groups):
        assert [id(p) for p in ours["params"]] == [id(stand_ins[p]) for p in theirs["params"]]
        assert {k: v for k, v in ours.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}

    class NeedsArg(torch.optim.SGD):
        def __init__(self, params, scale, lr=0.1):
            super().__init__(params, lr=lr * scale)

    with pytest.raises(TypeError, match=r"cannot rebuild NeedsArg from its param groups .* factory"):
        copy_for(NeedsArg(model.parameters(), 2.0), stand_ins)


def test_lr_sets_the_first_groups_lr_and_the_others_keep_their_ratio() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(1, 1))
    body, head, frozen = (list(m.parameters()) for m in model)
    groups = [{"params": body}, {"params": head, "lr": 1e-2, "weight_decay": 0.0}, {"params": frozen, "lr": 0.0}]
    instance = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    assert build_optimizer(instance, model.parameters(), lr=4e-3) is instance
    assert [g["lr"] for g in instance.param_groups] == pytest.approx([4e-3, 4e-2, 0.0], rel=1e-12)
    assert [g["weight_decay"] for g in instance.param_groups] == [0.1, 0.0, 0.1]
    # a copy (the trials of lr="auto") sets its LRs alike and leaves the instance as it was
    copy = copy_for(instance, {p: p for p in model.parameters()}, lr=1e-3)
    assert [g["lr"] for g in copy.param_groups] == pytest.approx([1e-3, 1e-2, 0.0], rel=1e-12)
    assert instance.param_groups[0]["lr"] == 4e-3
    # a factory f(params) building its own groups is treated as its instance would be
    two = build_optimizer(lambda ps: torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.2}], lr=0.1),
                          model.parameters(), lr=0.5)
    assert [g["lr"] for g in two.param_groups] == pytest.approx([0.5, 1.0], rel=1e-12)
    # groups of one LR all take lr, whatever it was; a ratio to an LR of 0 does not exist
    same = torch.optim.SGD([{"params": body}, {"params": head}], lr=0.0)
    assert [g["lr"] for g in build_optimizer(same, model.parameters(), lr=0.3).param_groups] == [0.3, 0.3]
    first_frozen = torch.optim.SGD([{"params": body, "lr": 0.0}, {"params": head}], lr=0.1)
    with pytest.raises(ValueError, match=r"cannot set lr=0.3 on the SGD: lr is the first param group's LR .*"
                                         r"\[0.0, 0.1\]; give the first group an LR > 0, or pass lr=None"):
        build_optimizer(first_frozen, model.parameters(), lr=0.3)
