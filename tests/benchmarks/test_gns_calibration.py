"""The arithmetic of benchmarks/gns_accuracy.py's calibration phase on made-up inputs."""

import itertools
import math

import pytest
import torch

from autobatch.noise import noise_scale_interval
from autobatch.testing import Exact
from benchmarks import gns_accuracy as ga


def test_batch_sizes_and_micro_batches_follow_the_accuracy_rows() -> None:
    assert ga.batch_for(158.3, 0.5) == 320  # 317, to a multiple of 8
    assert ga.batch_for(158.3, 16) == 10 and ga.batch_for(3.0, 4) == 2
    # measure_noise_scale's default micro-batch: the largest divisor of B up to B // 8
    assert [ga.micro_parts(b) for b in (320, 40, 10, 7, 2)] == [8, 8, 10, 7, 2]


def test_step_norms_are_those_of_the_micro_batch_mean_gradients() -> None:
    rows = torch.arange(30, dtype=torch.float64).reshape(10, 3) ** 0.5
    sizes, small, big = ga.step_norms(rows, 4)
    assert sizes == [3, 3, 2, 2]  # as fit splits 10 examples in 4
    starts = [0, 3, 6, 8, 10]
    expected = [float(rows[a:b].mean(0).square().sum()) for a, b in itertools.pairwise(starts)]
    assert small == pytest.approx(expected, rel=1e-12)
    assert big == pytest.approx(float(rows.mean(0).square().sum()), rel=1e-12)


def test_a_run_drives_each_scheme_as_its_loop_would() -> None:
    grads = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    readings = ga.calibration_run(grads, batch=12, parts=4, seed=0, read_at=(3, 30))
    assert {k: len(v) for k, v in readings.items()} == {"split": 2, "unsplit": 2, "mean": 2}
    # every reading has the standard errors and degrees of freedom the intervals need
    assert all(math.isfinite(r["trace_cov_se"]) and r["trace_cov_dof"] > 0 for v in readings.values() for r in v)
    # "unsplit" takes two halves on its first 20 steps, then on every 8th (done = 24), the
    # whole-step norm alone on the others: fewer tr(Sigma) draws than "split" behind step 30
    assert readings["unsplit"][1]["trace_cov_dof"] < readings["split"][1]["trace_cov_dof"]
    # "mean" weighs all 30 steps equally: 29 degrees of freedom
    assert readings["mean"][1]["trace_cov_dof"] == pytest.approx(29.0)


def _reading(g: float, g_se: float, s: float, s_se: float, dof: float = math.inf) -> dict[str, float]:
    return {"grad_sq": g, "grad_sq_se": g_se, "grad_sq_dof": dof, "trace_cov": s, "trace_cov_se": s_se,
            "trace_cov_dof": dof, "noise_scale": s / g, "noise_scale_se": 0.1 * s / g}


def test_coverage_counts_the_intervals_that_hold_the_exact_value() -> None:
    exact = Exact(noise_scale=10.0, grad_sq=1.0, trace_cov=10.0)
    readings = [
        _reading(1.05, 0.1, 10.5, 1.0),  # everything within one standard error
        _reading(1.5, 0.1, 10.0, 1.0),  # |G|^2 5 standard errors high: box [5.6, 7.9] misses 10
        # |G|^2 1.2 se high: held only once widened (1.32 se at 2 degrees of freedom), and so
        # is B_simple: 10.01 / (1.12 - 0.1) = 9.8 < 10 <= 10.02 / (1.12 - 0.132) = 10.1
        _reading(1.12, 0.1, 10.0, 0.01, dof=2.0),
        _reading(1.0, math.inf, 30.0, 1.0),  # no |G|^2 error known: that interval holds anything
    ]
    cov = ga.coverage(readings, exact, zs=(1.0, 2.0))
    z1, z2 = cov["z1"], cov["z2"]
    assert cov["seeds"] == 4
    assert (z1["grad_sq"], z1["grad_sq_z"]) == (0.75, 0.5)  # readings 1, 3 (widened), 4
    assert (z1["trace_cov"], z1["trace_cov_z"]) == (0.75, 0.75)  # all but the 4th (20 se off)
    assert (z1["box"], z1["box_z"]) == (0.75, 0.5)  # the 4th's box is [29/inf, inf] = [0, inf]
    assert (z2["grad_sq"], z2["grad_sq_z"], z2["box"]) == (0.75, 0.75, 0.75)
    # delta intervals (a tenth of the estimate here): only the first, 10 +- 1, holds 10
    assert z1["delta"] == 0.25
    lows = sorted(noise_scale_interval(r["grad_sq"], r["trace_cov"], r["grad_sq_se"], r["trace_cov_se"], 1.0,
                                       grad_sq_dof=r["grad_sq_dof"], trace_cov_dof=r["trace_cov_dof"])[0] / 10.0
                  for r in readings)
    assert z1["low"] == pytest.approx((lows[1] + lows[2]) / 2)
    assert z1["high"] is None or z1["high"] > 1.0
