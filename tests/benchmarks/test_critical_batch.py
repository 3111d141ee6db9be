"""benchmarks/critical_batch.py: the noise scale at frozen parameters against per-example
gradients computed one by one, the frontier fit against its closed form, the reading of examples
to a target by hand, and a small run's results against its own branches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import critical_batch as cb


def _problem(n: int = 48, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return model, (x, y)


def _per_example(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], weights=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x, y = data
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([(p.grad if weights is None else p.grad * weights[p]).flatten()
                               for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def _exact(grads: torch.Tensor) -> tuple[float, float]:
    mean = grads.mean(0)
    trace = float(((grads - mean) ** 2).sum() / (len(grads) - 1))
    return float(mean.pow(2).sum()), trace


@pytest.mark.parametrize("preconditioned", [False, True])
def test_the_noise_scale_with_single_examples_is_the_per_example_one(preconditioned: bool) -> None:
    model, data = _problem()
    weights = None
    if preconditioned:  # any positive weights: Adam's are 1/(sqrt(v_hat)+eps)
        weights = {p: torch.rand(p.shape, dtype=torch.float64) + 0.1 for p in model.parameters()}
    grad_sq, trace = _exact(_per_example(model, data, weights))
    got = cb.noise_scale_at(model, data, nn.functional.mse_loss, 1, weights)
    assert got["grad_sq"] == pytest.approx(grad_sq, rel=1e-9)
    assert got["trace_cov"] == pytest.approx(trace, rel=1e-9)
    assert got["noise_scale"] == pytest.approx(trace / grad_sq, rel=1e-9)


def test_the_noise_scale_from_batches_is_unbiased_over_partitions() -> None:
    model, (x, y) = _problem(n=48)
    grad_sq, trace = _exact(_per_example(model, (x, y)))
    g = torch.Generator().manual_seed(3)
    estimates = []
    for _ in range(400):  # the batches of 6 are one random partition each time
        order = torch.randperm(len(x), generator=g)
        got = cb.noise_scale_at(model, (x[order], y[order]), nn.functional.mse_loss, 6)
        assert got["grad_sq"] == pytest.approx(grad_sq, rel=1e-9)  # the mean gradient is every example's
        estimates.append(got["trace_cov"])
    spread = np.std(estimates) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - trace) < 4 * spread
    assert abs(np.mean(estimates) * 42 / 48 - trace) > 4 * spread  # without the (N-b)/N correction it fails


def test_the_frontier_fit_recovers_the_closed_form() -> None:
    e_min, b_crit = 3000.0, 96.0
    batches = [16, 32, 64, 128, 256]
    examples = [e_min * (1 + b / b_crit) for b in batches]  # E(B) on McCandlish's frontier
    fit = cb.fit_frontier(batches, examples)
    assert fit["b_crit"] == pytest.approx(b_crit) and fit["e_min"] == pytest.approx(e_min)
    assert fit["s_min"] == pytest.approx(e_min / b_crit) and fit["bound"] is None
    steps = [e / b for e, b in zip(examples, batches, strict=True)]  # and (S/S_min - 1)(E/E_min - 1) = 1
    for s, e in zip(steps, examples, strict=True):
        assert (s / fit["s_min"] - 1) * (e / fit["e_min"] - 1) == pytest.approx(1.0)
    assert cb.fit_frontier([8, 16, 32], [100.0, 100.0, 99.0])["bound"] == "above"  # examples flat: all below B_crit
    assert cb.fit_frontier([8, 16, 32], [10.0, 100.0, 300.0])["bound"] == "below"
    with pytest.raises(ValueError, match="two distinct"):
        cb.fit_frontier([8, 8], [1.0, 2.0])
    # The tolerance rule doubles the smallest E measured, E(16) = E_min (1 + 16/96): on the frontier
    # that is B <= B_crit + 2 * 16 = 128; with the true E_min it would be 96 (64 on the grid).
    assert cb.tolerance_b_crit(batches, examples) == 128
    assert cb.tolerance_b_crit([0, *batches], [e_min, *examples]) == 64
    assert cb.tolerance_b_crit([8, 16], [None, None]) is None


def test_examples_to_target_by_hand() -> None:
    ex = [0, 10, 20, 30]
    assert cb.examples_to_target(ex, [2.0, 1.5, 1.0, 0.5], 1.25) == pytest.approx(15.0)
    assert cb.examples_to_target(ex, [2.0, 1.5, 1.0, 0.5], 2.5) == 0.0
    assert cb.examples_to_target(ex, [2.0, 1.5, 1.0, 0.5], 0.4) is None
    # A bump is ignored (running minimum): the crossing is read on 2.0, 1.2, 1.2, 0.8.
    assert cb.examples_to_target(ex, [2.0, 1.2, 1.9, 0.8], 1.0) == pytest.approx(25.0)


def test_rules_and_optimizers() -> None:
    assert cb.rule_factor("linear", 4) == 4 and cb.rule_factor("sqrt", 4) == 2
    with pytest.raises(ValueError, match="'linear' or 'sqrt'"):
        cb.rule_factor("cubic", 2)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    opt = cb.make_optimizer(cb.TASKS["charlm-muon"], model, lr_scale=2.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 3e-3])
    cb.set_lr_scale(opt, [0.01, 1.5e-3], 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 7.5e-4])


def test_a_small_run_reads_its_own_branches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cb.json"
    cb.main(["--tasks", "mnist1d", "--budget-scale", "0.05", "--factors", "1", "2", "4", "--seeds", "1", "2",
             "--noise-examples", "512", "--out", str(out)])
    data = json.loads(out.read_text())
    assert (tmp_path / "cb_mnist1d.png").stat().st_size > 10_000
    (entry,) = data["tasks"]
    assert [p["fraction"] for p in entry["points"]] == [0.05, 0.2, 0.5]
    for point in entry["points"]:
        assert [r["batch"] for r in point["per_batch"]] == [16, 32, 64]
        for row in point["per_batch"]:  # each B's E is its best LR's crossing of the target
            tries = [cb.examples_to_target(br["examples"], br["loss"], point["target_loss"])
                     for br in point["branches"] if br["batch"] == row["batch"] and br["loss"] is not None]
            reached = [e for e in tries if e is not None]
            assert row["examples"] == (min(reached) if reached else None)
        base = [br for br in point["branches"] if br["batch"] == 16]
        assert len(base) == len(cb.TASKS["mnist1d"].lr_grid) and all(len(br["per_seed_final"]) == 2 for br in base)
        assert point["per_batch"][0]["examples"] is not None  # B0 reaches the target it set
        fit = point["fit"]
        if fit["b_crit"] is not None:
            assert fit["b_crit"] == pytest.approx(fit["e_min"] / fit["s_min"])
            assert point["ratios"]["raw"] == pytest.approx(point["noise"]["raw"]["noise_scale"] / fit["b_crit"])
        assert point["noise"]["raw"]["examples"] == 512 and point["noise"]["raw"]["noise_scale"] > 0
