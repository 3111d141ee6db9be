"""autobatch.muon: Muon for hidden matrices and AdamW for the rest, as one optimizer that fit,
the memory probe and checkpoints drive like any torch optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

import autobatch
from autobatch.muon import MuonAdamW, muon_param_groups
from autobatch.problems.charlm import CharTransformer
from autobatch.testing import token_loss

VOCAB, CONTEXT = 24, 12


def _model(seed: int = 0) -> CharTransformer:
    torch.manual_seed(seed)
    return CharTransformer(VOCAB, context=CONTEXT, d_model=16, heads=2, layers=2)


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, VOCAB, (n, CONTEXT + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def test_the_split_puts_hidden_matrices_under_muon_and_the_rest_under_adamw() -> None:
    model = _model()
    muon, adamw = muon_param_groups(model, lr=0.02, adamw_lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    under_muon = sorted(names[id(p)] for p in muon["params"])
    expected = sorted(n for n, p in model.named_parameters()
                      if p.ndim == 2 and not n.startswith(("tokens.", "positions.", "head.")))
    assert under_muon == expected and any("in_proj_weight" in n for n in under_muon)
    assert {names[id(p)] for p in adamw["params"]} == set(names.values()) - set(under_muon)
    assert (muon["algorithm"], muon["lr"], adamw["algorithm"], adamw["lr"]) == ("muon", 0.02, "adamw", 1e-3)


def test_a_step_equals_torchs_muon_and_adamw_run_side_by_side() -> None:
    model, twin = _model(), _model()
    opt = MuonAdamW(muon_param_groups(model))
    reference = [cls([{k: v for k, v in g.items() if k != "algorithm"}])
                 for cls, g in zip((torch.optim.Muon, torch.optim.AdamW), muon_param_groups(twin))]
    x, y = _data(8)
    for _ in range(3):
        for net, opts in ((model, [opt]), (twin, reference)):
            for o in opts:
                o.zero_grad()
            token_loss(net(x), y).backward()
            for o in opts:
                o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_bad_groups_are_refused_with_the_fix() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"algorithm=None; give 'muon' or 'adamw'"):
        MuonAdamW([{"params": list(model.parameters()), "lr": 0.1}])
    with pytest.raises(ValueError, match=r"Muon updates 2-D matrices only.*\(24,\).*'adamw' group"):
        MuonAdamW([{"params": [model.head.bias], "lr": 0.1, "algorithm": "muon"}])


def test_fit_trains_probes_and_resumes_bit_exactly(tmp_path) -> None:
    data = _data()
    kwargs = dict(loss_fn=token_loss, loss_items="tokens", initial_batch_size=16, progress=False)
    full = _model()
    autobatch.fit(full, data, optimizer=MuonAdamW(muon_param_groups(full)), max_steps=12, **kwargs)
    part = _model()
    autobatch.fit(part, data, optimizer=MuonAdamW(muon_param_groups(part)), max_steps=5, checkpoint_dir=tmp_path,
                  checkpoint_every=1, **kwargs)
    resumed = _model()
    res = autobatch.fit(resumed, data, optimizer=MuonAdamW(muon_param_groups(resumed)), max_steps=12,
                        checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert res.steps == 12
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    # the probe rebuilds the optimizer over stand-in parameters from its groups (copy_for)
    model = _model()
    opt = MuonAdamW(muon_param_groups(model))
    before = copy.deepcopy(opt.state_dict())
    probe = autobatch.probe_memory(model, data, token_loss, optimizer=opt, budget_bytes=2_000_000)
    adam = autobatch.probe_memory(model, data, token_loss, optimizer=torch.optim.AdamW, budget_bytes=2_000_000)
    assert probe.max_micro_batch_size >= adam.max_micro_batch_size  # Muon holds one buffer, Adam two
    assert opt.state_dict() == before
