"""autobatch._state: preserved_state puts back everything a measurement touches."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from autobatch._state import preserved_state


def test_preserved_state_restores_everything_a_measurement_touches() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model[1].eval()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    opt_state = [s["exp_avg"].clone() for s in opt.state.values()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for offload in (False, True):
        with preserved_state(model, opt, weights=True, offload=offload, train=True):
            assert all(p.grad is None for p in model.parameters()) and model[1].training
            model(torch.randn(8, 3)).sum().backward()  # BatchNorm stats move, dropout draws
            opt.step()
            random.random(), np.random.rand()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert [m.training for m in model] == [True, False, True, True]
        assert next(iter(opt.state.values()))["exp_avg"].equal(opt_state[0])
        assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
        assert np.array_equal(np.random.get_state()[1], rng[2])
        if not offload:
            assert all(p.grad is g for p, g in zip(model.parameters(), grads))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
