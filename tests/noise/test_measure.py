"""measure_noise_scale against the exact B_simple of whole small data sets."""

from __future__ import annotations

import functools
import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autobatch.noise import NoiseScaleEstimate, measure_noise_scale, two_batch_estimates
from autobatch.noise._effective_batch import without_replacement_batch_size
from autobatch.testing import EXACT_CASES, Exact, ExactCase, exact_noise_scale

# Parameters are the problems' initial ones, except the sequence model, whose initial noise
# scale is tiny (about 5); 20 full-batch steps bring it to about 150.
SETTLE = {"logistic": 0, "mlp": 0, "cnn": 0, "sequence": 20}


@functools.cache
def _problem_and_exact(name: str) -> tuple[ExactCase, Exact]:
    problem = EXACT_CASES[name](n=16384, steps=SETTLE[name])
    return problem, exact_noise_scale(problem)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["micro", "per_example"])
@pytest.mark.parametrize("name", sorted(EXACT_CASES))
def test_estimate_within_10_percent_of_exact(name: str, method: str) -> None:
    problem, exact = _problem_and_exact(name)
    # The hard end of the promised range: the largest power of two B with B_simple/B in (2, 4].
    batch = 2 ** math.ceil(math.log2(exact.noise_scale / 4))
    assert 2 < exact.noise_scale / batch <= 4
    est = measure_noise_scale(
        problem.model, (problem.x, problem.y), problem.loss_fn, batch_size=batch, method=method, seed=0
    )
    assert est.noise_scale == pytest.approx(exact.noise_scale, rel=0.10)
    assert est.trace_cov == pytest.approx(exact.trace_cov, rel=0.10)
    assert est.num_batches == 16384 // batch and est.samples_used == est.num_batches * batch
    assert 0 < est.noise_scale_stderr < 0.1 * est.noise_scale


def test_without_replacement_sizes_make_the_estimator_exactly_unbiased() -> None:
    # Expectations over every subset of a tiny set, enumerated: E|G_b|^2 for b = 2 and 4 out
    # of N = 8 vectors. Fed with the effective sizes, the two-batch formulas must return the
    # population |G|^2 and tr(Sigma) exactly; with the nominal sizes they are biased.
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(8, 5, generator=gen, dtype=torch.float64) + 0.3
    grad_sq = float(g.mean(0).square().sum())
    trace_cov = float((g - g.mean(0)).square().sum(1).mean())

    def expected_sq(b: int) -> float:
        subsets = list(itertools.combinations(range(8), b))
        return sum(float(g[list(s)].mean(0).square().sum()) for s in subsets) / len(subsets)

    small, big = expected_sq(2), expected_sq(4)
    est_g, est_s = two_batch_estimates(small, without_replacement_batch_size(2, 8), big, without_replacement_batch_size(4, 8))
    assert (est_g, est_s) == (pytest.approx(grad_sq, rel=1e-12), pytest.approx(trace_cov, rel=1e-12))
    naive_g, _ = two_batch_estimates(small, 2, big, 4)
    assert naive_g == pytest.approx(grad_sq - trace_cov / 7, rel=1e-12)
    # The whole set as the big batch: its gradient is exact.
    est_g, est_s = two_batch_estimates(
        small, without_replacement_batch_size(2, 8), float(g.mean(0).square().sum()), without_replacement_batch_size(8, 8)
    )
    assert (est_g, est_s) == (pytest.approx(grad_sq, rel=1e-12), pytest.approx(trace_cov, rel=1e-12))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        self.frozen_head = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen_head(self.body(x)))


def test_model_grads_modes_buffers_and_rng_are_left_as_they_were(classification) -> None:
    model = _Net()
    x, y = classification(64, 4)
    F.cross_entropy(model(x), y).backward()  # leave some .grad behind
    model.body[1].eval()  # a deliberate per-module mode
    model.head.weight.grad = None  # and a parameter without .grad
    params = [p.detach().clone() for p in model.parameters()]
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    random.seed(5)
    np.random.seed(5)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    est = measure_noise_scale(model, (x, y), F.cross_entropy, batch_size=16, micro_batch_size=4, seed=1)

    assert isinstance(est, NoiseScaleEstimate) and math.isfinite(est.noise_scale)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    for (obj, value), p in zip(grads, model.parameters()):
        assert p.grad is obj and (value is None or torch.equal(p.grad, value))
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1] and np.array_equal(np.random.get_state()[1], rng[2])


def test_seed_repeats_and_every_data_form_gives_the_same_estimate(classification) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = classification(64, 4)
    kwargs = {"batch_size": 16, "num_batches": 3, "seed": 7}
    first = measure_noise_scale(model, (x, y), F.cross_entropy, **kwargs)
    for data in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5)):
        assert measure_noise_scale(model, data, F.cross_entropy, **kwargs) == first
    per_example = measure_noise_scale(model, (x, y), F.cross_entropy, method="per_example", micro_batch_size=8, **kwargs)
    assert (first.micro_batch_size, per_example.micro_batch_size) == (2, 8)
    assert first.samples_used == 48 and first.num_batches == 3


def test_bad_inputs_say_what_is_wrong_and_how_to_fix_it(classification) -> None:
    model = nn.Linear(4, 3)
    x, y = classification(64, 4)
    data = (x, y)
    cases = [
        (dict(model=nn.Linear(4, 3).requires_grad_(False)), ValueError, "no trainable parameters"),
        (
            dict(loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none")),
            ValueError,
            r"loss_fn must return a scalar tensor \(got a tensor of shape \(2,\)\); reduce it with .mean\(\)",
        ),
        (dict(batch_size=1), ValueError, r"batch_size must be >= 2 \(got batch_size=1\)"),
        (dict(micro_batch_size=3), ValueError, r"must divide batch_size .* micro_batch_size=3, batch_size=16"),
        (dict(micro_batch_size=32), ValueError, r"at most batch_size \(got micro_batch_size=32"),
        (dict(micro_batch_size=16), ValueError, "at least 2 micro-batches"),
        (dict(num_batches=0), ValueError, r"num_batches must be >= 1 \(got num_batches=0\).*4 of batch_size=16"),
        (dict(batch_size=128), ValueError, r"batch_size=128 is larger than one pass over the data \(64 examples\)"),
        (dict(data=(x,)), TypeError, r"\(inputs, targets\) or \(x1, ..., xk, targets\), got a tuple of length 1"),
        (dict(data=TensorDataset(x)), TypeError, r"\(input, target\) pairs.*forward_loss"),
        (dict(method="exact"), ValueError, "method must be one of"),
    ]
    for change, error, pattern in cases:
        args = {"model": model, "data": data, "loss_fn": F.cross_entropy, "batch_size": 16, **change}
        with pytest.raises(error, match=pattern):
            measure_noise_scale(args.pop("model"), args.pop("data"), args.pop("loss_fn"), **args)


def test_more_batches_than_one_pass_reshuffle_each_pass_and_stay_exact() -> None:
    # Must show (issue 10): 500 batches of B = 256 from 6,000 examples (23 passes) within 10%
    # of the exact B_simple. One pass (23 batches) was all the old code allowed.
    problem = EXACT_CASES["mlp"](n=6000, steps=20)
    exact = exact_noise_scale(problem)
    assert 256 <= exact.noise_scale <= 1000
    est = measure_noise_scale(problem.model, (problem.x, problem.y), problem.loss_fn,
                              batch_size=256, num_batches=500, seed=0)
    assert est.num_batches == 500 and est.samples_used == 500 * 256
    assert est.noise_scale == pytest.approx(exact.noise_scale, rel=0.10)
    assert est.trace_cov == pytest.approx(exact.trace_cov, rel=0.10)


def test_passes_are_disjoint_batches_of_fresh_shuffles() -> None:
    from autobatch.data import as_batch_source
    from autobatch.noise.measure import _batches

    source = as_batch_source((torch.zeros(10, 1), torch.zeros(10)))
    batches = [b.tolist() for b in _batches(source, 3, 7, seed=1)]
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    passes = [batches[0:3], batches[3:6]]
    for one_pass in passes:  # 3 full batches per pass of 10, disjoint; the tail is left out
        flat = [i for b in one_pass for i in b]
        assert len(set(flat)) == 9
    assert passes[0] != passes[1]  # reshuffled


def test_a_dataloader_sampler_draws_the_batches_as_independent_draws() -> None:
    # Uniform draws with replacement: unbiased with the nominal sizes (no finite-population
    # correction), so the estimate converges to the data set's exact value all the same.
    problem = EXACT_CASES["mlp"](n=2048, steps=20)
    exact = exact_noise_scale(problem)
    sampler = torch.utils.data.RandomSampler(TensorDataset(problem.x), replacement=True)
    loader = DataLoader(TensorDataset(problem.x, problem.y), batch_size=1, sampler=sampler)
    est = measure_noise_scale(problem.model, loader, problem.loss_fn, batch_size=128,
                              num_batches=300, seed=0)
    assert est.noise_scale == pytest.approx(exact.noise_scale, rel=0.10)
