from __future__ import annotations

import functools
import math
import random

import pytest
import torch

from autobatch.registry import LR_SCALINGS
from autobatch.scaling import (
    AdaScaleScaling,
    LinearScaling,
    SqrtScaling,
    adascale_gain,
    default_scaling,
    linear_factor,
    make_scaling,
    noise_cap,
    sqrt_factor,
)


def _mccandlish_ratio(b: int, b0: int, noise: float) -> float:
    """eps_opt(B) / eps_opt(B0) with eps_opt(B) = eps_max / (1 + B_noise/B) (McCandlish 2018)."""
    return (1.0 + noise / b0) / (1.0 + noise / b)


def test_linear_and_sqrt_by_hand() -> None:
    assert linear_factor(96, 32) == 3.0
    assert linear_factor(16, 32) == 0.5
    assert sqrt_factor(128, 32) == 2.0
    assert sqrt_factor(8, 32) == 0.5


def test_adascale_by_hand() -> None:
    # B0=32, B=128: S=4; tr(Sigma)=320, |G|^2=1: s2=10, m2=1 -> r = 11 / (10/4 + 1) = 22/7.
    assert adascale_gain(128, 32, grad_sq=1.0, trace_cov=320.0) == pytest.approx(22 / 7, rel=1e-15)


def test_adascale_equals_the_optimal_lr_ratio_of_the_noise_model() -> None:
    rng = random.Random(0)
    for _ in range(200):
        b0 = rng.choice([1, 8, 32, 100])
        b = rng.randint(1, 5000)
        grad_sq = 10 ** rng.uniform(-6, 2)
        noise = 10 ** rng.uniform(-1, 5)
        got = adascale_gain(b, b0, grad_sq=grad_sq, trace_cov=noise * grad_sq)
        assert got == pytest.approx(_mccandlish_ratio(b, b0, noise), rel=1e-9)
        assert min(1.0, b / b0) <= got <= max(1.0, b / b0)


def test_adascale_limits() -> None:
    # No noise: the gradient is exact, a bigger batch buys nothing.
    assert adascale_gain(512, 32, grad_sq=1.0, trace_cov=0.0) == 1.0
    # Pure noise: the linear rule.
    assert adascale_gain(512, 32, grad_sq=1e-30, trace_cov=1.0) == pytest.approx(16.0)
    # Huge batch: the bound 1 + B_noise/B0.
    assert adascale_gain(10**9, 32, grad_sq=1.0, trace_cov=64.0) == pytest.approx(noise_cap(32, 1.0, 64.0), rel=1e-6)


@pytest.mark.parametrize(("grad_sq", "trace_cov"), [(math.nan, 1.0), (1.0, math.nan), (math.inf, 1.0), (0.0, 5.0), (-1.0, 5.0)])
def test_adascale_unknown_noise_is_conservative(grad_sq: float, trace_cov: float) -> None:
    assert adascale_gain(128, 32, grad_sq, trace_cov) == 1.0  # no increase above B0
    assert adascale_gain(16, 32, grad_sq, trace_cov) == 0.5  # the linear decrease below B0


def test_noise_cap_by_hand() -> None:
    # B_noise = 64 / 1 = 64, B0 = 32 -> 1 + 64/32 = 3.
    assert noise_cap(32, grad_sq=1.0, trace_cov=64.0) == 3.0
    assert noise_cap(32, grad_sq=math.nan, trace_cov=64.0) == math.inf
    assert noise_cap(32, grad_sq=2.0, trace_cov=-1.0) == 1.0


def test_linear_and_sqrt_are_capped_at_the_noise_bound() -> None:
    known = {"grad_sq": 1.0, "trace_cov": 64.0}  # cap 3
    assert LinearScaling().factor(64, 32, **known) == 2.0  # below the cap
    assert LinearScaling().factor(256, 32, **known) == 3.0  # 8 -> 3
    assert SqrtScaling().factor(512, 32, **known) == 3.0  # 4 -> 3
    assert SqrtScaling().factor(128, 32, **known) == 2.0
    assert LinearScaling(cap_at_noise_scale=False).factor(256, 32, **known) == 8.0
    assert LinearScaling().factor(256, 32) == 8.0  # noise unknown: the plain rule
    assert LinearScaling().factor(16, 32, **known) == 0.5  # the cap only limits growth


# -- the shared suite: every rule in the registry -----------------------------------------------
@pytest.mark.parametrize("name", sorted(LR_SCALINGS))
def test_every_rule_is_one_at_the_base_and_monotone(name: str) -> None:
    for noise in [(math.nan, math.nan), (1.0, 64.0), (1e-3, 50.0)]:
        rule = make_scaling(name)  # fresh: a rule that reads the noise holds what it saw
        kw = {"grad_sq": noise[0], "trace_cov": noise[1]}
        assert rule.factor(32, 32, **kw) == pytest.approx(1.0)
        values = [rule.factor(b, 32, **kw) for b in range(1, 2000, 7)]
        assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
        # Never faster than linear above B0, never slower than linear below it.
        for b in (1, 8, 31, 33, 100, 1999):
            f = rule.factor(b, 32, **kw)
            assert (f <= b / 32 + 1e-12) if b >= 32 else (f >= b / 32 - 1e-12)


@pytest.mark.parametrize("name", sorted(LR_SCALINGS))
def test_bad_batch_sizes_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=r"batch sizes must be >= 1 \(got batch_size=0, base_batch_size=32\)"):
        make_scaling(name).factor(0, 32)


def test_make_scaling() -> None:
    assert isinstance(make_scaling("adascale"), AdaScaleScaling)
    rule = SqrtScaling(cap_at_noise_scale=False)
    assert make_scaling(rule) is rule
    with pytest.raises(ValueError, match="unknown lr_scaling 'cubic'; allowed: adascale, linear, none, sqrt"):
        make_scaling("cubic")
    with pytest.raises(ValueError, match=r"unknown lr_scaling 'sqr'; .*LRScaling instance; did you mean 'sqrt'\?"):
        make_scaling("sqr")


def test_default_scaling_by_optimizer_family() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert default_scaling(torch.optim.SGD(params, lr=0.1)) == "adascale"
    assert default_scaling(torch.optim.SGD) == "adascale"
    assert default_scaling(functools.partial(torch.optim.SGD, momentum=0.9)) == "adascale"
    assert default_scaling("SGD") == "adascale"
    assert default_scaling(torch.optim.Adam(params)) == "sqrt"
    assert default_scaling(torch.optim.AdamW) == "sqrt"
    assert default_scaling("adam") == "sqrt"

