from __future__ import annotations

import functools
import itertools
import math
import pickle
import random

import pytest
import torch

from autobatch.registry import LR_SCALINGS, make_scaling
from autobatch.scaling import (
    AdaScaleScaling,
    LinearScaling,
    SqrtScaling,
    adascale_gain,
    default_scaling,
    linear_factor,
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
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))
        # Never faster than linear above B0, never slower than linear below it.
        for b in (1, 8, 31, 33, 100, 1999):
            f = rule.factor(b, 32, **kw)
            assert (f <= b / 32 + 1e-12) if b >= 32 else (f >= b / 32 - 1e-12)


@pytest.mark.parametrize("name", sorted(LR_SCALINGS))
def test_bad_batch_sizes_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=r"batch sizes must be >= 1 \(got batch_size=0, base_batch_size=32\)"):
        make_scaling(name).factor(0, 32)


# One run's (B, grad_sq, trace_cov) as the loop passes them: unknown at first, then known and
# drifting, then lost (NaN while the estimator is not ready, or an averaged |G|^2 <= 0), then
# known again.
_NAN = math.nan
_RUN = [
    (32, _NAN, _NAN), (32, _NAN, _NAN),
    (64, 1.0, 64.0), (128, 0.8, 70.0), (128, 0.5, 80.0),
    (128, _NAN, _NAN), (128, -0.1, 90.0), (256, 0.0, 90.0), (256, _NAN, 1.0),
    (256, 0.4, 60.0), (512, 0.3, 66.0),
]


@pytest.mark.parametrize("name", sorted(LR_SCALINGS))
def test_every_rule_resumes_from_its_state(name: str) -> None:
    # Checkpoint inside the loss of the estimate: the restored rule (its state pickled, as the
    # checkpoint file stores it) must give the same factors as the one that kept running.
    original = make_scaling(name)
    for b, g, s in _RUN[:7]:
        original.factor(b, 32, grad_sq=g, trace_cov=s)
    restored = make_scaling(name)
    restored.load_state_dict(pickle.loads(pickle.dumps(original.state_dict())))
    for b, g, s in _RUN[7:]:
        assert restored.factor(b, 32, grad_sq=g, trace_cov=s) == original.factor(b, 32, grad_sq=g, trace_cov=s)


def test_a_lost_estimate_holds_the_last_factor() -> None:
    rule = AdaScaleScaling()
    factors = [rule.factor(b, 32, grad_sq=g, trace_cov=s) for b, g, s in _RUN]
    by_hand = [adascale_gain(b, 32, g, s) for b, g, s in _RUN]
    # Before any estimate: min(1, B/B0); while known: the gain at the estimate.
    assert factors[:5] == by_hand[:5] and factors[:2] == [1.0, 1.0]
    # Lost at B=128: the last gain (at 0.5, 80.0) holds instead of dropping to 1 ...
    held = adascale_gain(128, 32, 0.5, 80.0)
    assert held == pytest.approx((2.5 + 0.5) / (2.5 / 4 + 0.5)) == pytest.approx(8 / 3)  # s2 = 80/32, S = 4
    assert factors[5:7] == [held, held] and by_hand[5:7] == [1.0, 1.0]
    # ... and at B=256 it is the gain of the held estimate at the new B.
    assert factors[7:9] == [adascale_gain(256, 32, 0.5, 80.0)] * 2
    # Known again: follows the new estimate.
    assert factors[9:] == by_hand[9:]


def test_a_lost_estimate_keeps_the_noise_cap_of_linear_and_sqrt() -> None:
    for rule, plain in [(LinearScaling(), linear_factor), (SqrtScaling(), sqrt_factor)]:
        assert rule.factor(512, 32, grad_sq=1.0, trace_cov=64.0) == 3.0  # capped at 1 + 64/32
        # Without the hold the lost estimate would lift the cap: 16 (linear) or 4 (sqrt).
        assert plain(512, 32) > 3.0
        assert rule.factor(512, 32, grad_sq=-1.0, trace_cov=64.0) == 3.0
        assert rule.factor(512, 32) == 3.0
    fresh = LinearScaling()
    assert fresh.factor(512, 32) == 16.0  # nothing held yet: the plain rule
    assert repr(fresh) == "LinearScaling(cap_at_noise_scale=True)"


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



class _DropsToOne(AdaScaleScaling):
    """AdaScale as it was before the hold: factor 1 whenever the estimate is lost."""

    def factor(self, batch_size: int, base_batch_size: int, *, grad_sq: float = math.nan,
               trace_cov: float = math.nan) -> float:
        return adascale_gain(batch_size, base_batch_size, grad_sq, trace_cov)


def _lr_flips(rule: AdaScaleScaling) -> tuple[int, int]:
    """Fit an MLP on sklearn's digits (plain SGD, LR 0.1 at B0 = 32, fit's defaults otherwise:
    gns policy, LR factor capped at 2) for 600 steps; returns (steps at the base LR with B >
    B0 after the LR first rose, LR jumps of more than 20% between two steps at the same B)."""
    from autobatch import fit

    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-8), dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    result = fit(model, (x, torch.tensor(y)), loss_fn=torch.nn.functional.cross_entropy,
                 optimizer=torch.optim.SGD, lr=0.1, initial_batch_size=32, max_steps=600, seed=0,
                 lr_scaling=rule, progress=False)
    h = result.history
    rose = next(i for i, s in enumerate(h) if s.lr > 0.1)
    at_base = sum(s.lr == 0.1 and s.batch_size > 32 for s in h[rose:])
    jumps = sum(abs(b.lr - a.lr) > 0.2 * a.lr for a, b in itertools.pairwise(h) if a.batch_size == b.batch_size)
    return at_base, jumps


@pytest.mark.slow
def test_a_fit_on_digits_does_not_flip_the_lr_when_the_estimate_is_lost() -> None:
    # On this problem the averaged |G|^2 falls to <= 0 for much of the run. Without the hold
    # the LR fell back to the base LR there and flipped between 0.1 and 0.2 (measured: 260
    # steps at 0.1 with B > B0, 23 jumps); with it the LR stays put (measured: 0 and 0; a
    # jump is allowed when a recovered estimate differs from the held one).
    torch.manual_seed(0)
    at_base, jumps = _lr_flips(AdaScaleScaling())
    assert at_base == 0 and jumps <= 2
    torch.manual_seed(0)
    at_base, jumps = _lr_flips(_DropsToOne())
    assert at_base > 50 and jumps > 5
