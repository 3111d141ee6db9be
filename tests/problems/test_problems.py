from __future__ import annotations

import math
import pathlib
import pickle
import random
import sysconfig

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from autobatch.problems import Problem
from autobatch.problems import charlm as charlm_module
from autobatch.problems.synthetic import gradient_moments
from autobatch.registry import PROBLEMS, get_problem

# Small but real settings per example, so each test builds in well under a second after the
# first (data is cached per process).
SMALL = {
    "mnist1d": {},
    "synthetic": {"num_train": 512, "num_val": 256},
    "charlm": {"max_chars": 20_000},
}


@pytest.fixture(params=sorted(PROBLEMS))
def example(request: pytest.FixtureRequest) -> Problem:
    return get_problem(request.param, seed=0, **SMALL[request.param])


def _manual_metrics(ex: Problem, model: torch.nn.Module) -> dict[str, float]:
    """Loss and accuracy over the whole validation set in one forward pass, written out."""
    x, y = ex.val_data
    with torch.no_grad():
        out = model(x)
    if ex.classification:
        logp = torch.log_softmax(out, dim=-1)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        accuracy = (out.argmax(-1) == y).double().mean().item()
        return {"val_loss": nll.mean().item(), "val_accuracy": accuracy}
    return {"val_loss": ((out - y) ** 2).mean().item()}


def test_registry_lists_the_three_examples() -> None:
    assert set(PROBLEMS) == {"mnist1d", "synthetic", "charlm"}


def test_unknown_example_names_the_allowed_ones() -> None:
    allowed = r"allowed: charlm, mnist1d, synthetic, or build your own .*; did you mean 'mnist1d'\?"
    with pytest.raises(ValueError, match=r"unknown problem 'mnist2d'; " + allowed):
        get_problem("mnist2d")


def test_unknown_option_names_the_allowed_ones() -> None:
    message = r"unknown option\(s\) \['depth'\] for problem 'charlm'.*'context'"
    with pytest.raises(ValueError, match=message):
        get_problem("charlm", depth=3)


def test_bad_option_values_are_all_reported() -> None:
    message = r"min_variance must be in \(0, 1\] \(got min_variance=2.0\).*noise_std must be > 0"
    with pytest.raises(ValueError, match=message):
        get_problem("synthetic", min_variance=2.0, noise_std=0.0)


def test_example_builds_consistently(example: Problem) -> None:
    x, y = example.train_data
    xv, yv = example.val_data
    assert x.shape[0] == y.shape[0] > example.default_batch_size
    assert xv.shape[0] == yv.shape[0] > 0 and xv.shape[1:] == x.shape[1:]
    model = example.model_fn()
    out = model(x[:5])
    loss = example.loss_fn(out, y[:5])
    assert loss.ndim == 0 and torch.isfinite(loss)
    metrics = example.evaluate(model, example.val_data)
    assert example.metric_name in metrics
    opt = example.optimizer(model.parameters(), example.default_lr)
    assert opt.param_groups[0]["lr"] == example.default_lr


def test_model_fn_is_seeded_fresh_and_leaves_the_global_rng_alone(example: Problem) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b = example.model_fn(), example.model_fn()
    assert torch.equal(torch.rand(3), before)  # the global stream did not move
    assert a is not b
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert pa.data_ptr() != pb.data_ptr()
    other = get_problem(example.name, seed=1, **SMALL[example.name]).model_fn()
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), other.parameters()))


def test_example_pickles_for_worker_processes(example: Problem) -> None:
    copy = pickle.loads(pickle.dumps(example))
    assert torch.equal(copy.val_data[1], example.val_data[1])
    for pa, pb in zip(copy.model_fn().parameters(), example.model_fn().parameters()):
        assert torch.equal(pa, pb)


def test_each_call_returns_its_own_data(example: Problem) -> None:
    again = get_problem(example.name, seed=0, **SMALL[example.name])
    assert torch.equal(again.train_data[0], example.train_data[0])
    again.train_data[0].zero_()
    assert not torch.equal(again.train_data[0], example.train_data[0])


@pytest.mark.parametrize("batch_size", [7, 1024])
def test_evaluate_matches_a_written_out_computation(example: Problem, batch_size: int) -> None:
    model = example.model_fn()
    with torch.no_grad():  # move away from init so the accuracy is not trivially ~chance
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    got = example.evaluate(model, example.val_data, batch_size=batch_size)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    want = _manual_metrics(example, model)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    model.eval()
    example.evaluate(model, example.val_data)
    assert not model.training


def test_reached_follows_the_metric_direction() -> None:
    acc = get_problem("mnist1d")
    assert acc.reached({"val_accuracy": 0.95, "val_loss": 9.0})
    assert not acc.reached({"val_accuracy": 0.5, "val_loss": 0.0})
    loss = get_problem("synthetic", **SMALL["synthetic"])
    assert loss.reached({"val_loss": loss.target * 0.99})
    assert not loss.reached({"val_loss": math.nan})


def test_mnist1d_sizes_and_generator_leaves_global_rngs_alone() -> None:
    from autobatch.problems.mnist1d import make_data

    np.random.seed(7)
    random.seed(7)
    want_np, want_py = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    (x, y), (xt, yt) = make_data(num_samples=1000, data_seed=3)
    assert (np.random.rand(), random.random()) == (want_np, want_py)
    assert x.shape == (800, 40) and xt.shape == (200, 40) and x.dtype == torch.float32
    assert torch.bincount(torch.cat([y, yt])).tolist() == [100] * 10
    ex = get_problem("mnist1d")
    assert ex.train_data[0].shape == (4000, 40) and ex.val_data[0].shape == (1000, 40)


def test_mnist1d_a_few_hundred_sgd_steps_beat_chance_by_far() -> None:
    ex = get_problem("mnist1d", seed=0)
    model = ex.model_fn()
    opt = ex.optimizer(model.parameters(), ex.default_lr)
    x, y = ex.train_data
    g = torch.Generator().manual_seed(0)
    assert ex.evaluate(model, ex.val_data)["val_accuracy"] < 0.2  # ~chance (10%) at init
    for _ in range(300):
        idx = torch.randint(0, x.shape[0], (ex.default_batch_size,), generator=g)
        loss = ex.loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Measured ~39% after 300 steps at B=16, lr 0.2; 30% is three times chance.
    assert ex.evaluate(model, ex.val_data)["val_accuracy"] > 0.30


def test_gradient_moments_by_hand_in_one_dimension() -> None:
    # x ~ N(0, 1), y = 0, model w = 1, b = 0: r = x, g = (2x^2, 2x), G = (2, 0),
    # Var(2x^2) = 4 * 2 = 8, Var(2x) = 4: tr(Sigma) = 12.
    one = torch.tensor([1.0])
    assert gradient_moments(one, 0.0, one, 0.0) == pytest.approx((4.0, 12.0))
    # Only a bias error c with noise s^2: r = c - eps, g = 2r(x, 1); G = (0, 2c);
    # Var over w: E[4 r^2 x^2] = 4(c^2 + s^2); over b: 4 s^2.
    c, s2 = 0.5, 0.3
    assert gradient_moments(torch.tensor([0.0]), c, torch.tensor([1.0]), s2) == pytest.approx(
        (4 * c * c, 4 * (c * c + s2) + 4 * s2)
    )


@pytest.mark.parametrize("toward_optimum", [0.0, 0.8])
def test_synthetic_exact_noise_scale_matches_per_example_gradients(toward_optimum: float) -> None:
    ex = get_problem("synthetic", seed=0)
    model = ex.model_fn()
    pop = ex.population
    with torch.no_grad():  # move part of the way to the optimum, where B_simple is larger
        w = model.weight.double() + toward_optimum * (pop.w_star - model.weight.double())
        model.weight.copy_(w.float())
        model.bias.add_(toward_optimum * (pop.b_star - model.bias))
    n = 200_000
    x, y = pop.sample(n, torch.Generator().manual_seed(11))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return ex.loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(n, -1) for g in per_example.values()], dim=1).double()
    trace_cov = flat.var(dim=0).sum().item()
    mean = flat.mean(dim=0)
    grad_sq = (mean @ mean).item() - trace_cov / n  # unbiased |G|^2
    exact_grad_sq, exact_trace_cov = ex.exact_moments(model)
    assert exact_trace_cov == pytest.approx(trace_cov, rel=0.02)
    assert exact_grad_sq == pytest.approx(grad_sq, rel=0.03)
    assert ex.exact_noise_scale(model) == pytest.approx(trace_cov / grad_sq, rel=0.04)


def test_synthetic_noise_scale_grows_toward_the_optimum() -> None:
    ex = get_problem("synthetic", **SMALL["synthetic"])
    model = ex.model_fn()
    pop = ex.population
    scales = []
    for frac in (0.0, 0.9, 0.99):
        with torch.no_grad():
            model.weight.copy_((pop.w_star * frac).float().reshape(1, -1))
            model.bias.fill_(pop.b_star * frac)
        scales.append(ex.exact_noise_scale(model))
    assert scales[0] < scales[1] < scales[2]
    assert scales[2] > 50 * scales[0]


def test_charlm_text_is_the_listed_stdlib_files_read_again() -> None:
    charlm_module.load_text.cache_clear()
    text = charlm_module.load_text(50_000)
    stdlib = sysconfig.get_paths()["stdlib"]
    names = charlm_module.STDLIB_MODULES
    raw = "\n".join(pathlib.Path(stdlib, name).read_text(encoding="utf-8") for name in names)
    want = "".join(c if c == "\n" or 32 <= ord(c) <= 126 else "?" for c in raw[:50_000])
    assert text == want
    assert charlm_module.load_text(50_000) is text  # cached


def test_charlm_examples_are_shifted_windows_of_the_text() -> None:
    ex = get_problem("charlm", max_chars=20_000, context=32, val_every=5)
    vocab = ex.options["vocab"]
    assert list(vocab) == sorted(set(vocab)) and len(vocab) <= 96
    text = charlm_module.load_text(20_000)
    x, y = ex.train_data
    xv, _ = ex.val_data
    assert x.dtype == y.dtype == torch.long and x.shape[1] == y.shape[1] == 32
    assert torch.equal(x[:, 1:], y[:, :-1])
    decode = lambda ids: "".join(vocab[i] for i in ids.tolist())  # noqa: E731
    # Window k starts at character 32k; every 5th window (k = 4, 9, ...) is validation.
    assert decode(x[0]) + decode(y[0])[-1] == text[:33]
    assert decode(xv[0]) == text[4 * 32 : 5 * 32]
    assert decode(x[4]) == text[5 * 32 : 6 * 32]
    assert x.shape[0] + xv.shape[0] == (len(text) - 1) // 32


def test_charlm_initial_loss_is_close_to_log_vocab() -> None:
    ex = get_problem("charlm", **SMALL["charlm"])
    loss = ex.evaluate(ex.model_fn(), ex.val_data)["val_loss"]
    assert loss == pytest.approx(math.log(len(ex.options["vocab"])), abs=0.05)


def test_charlm_is_causal() -> None:
    ex = get_problem("charlm", **SMALL["charlm"])
    model = ex.model_fn().eval()
    x = ex.val_data[0][:2].clone()
    with torch.no_grad():
        before = model(x)
        x[:, 40:] = (x[:, 40:] + 1) % len(ex.options["vocab"])
        after = model(x)
    assert torch.allclose(before[:, :40], after[:, :40], atol=1e-6)
    assert not torch.allclose(before[:, 40:], after[:, 40:], atol=1e-3)
