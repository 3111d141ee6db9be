"""The plain maths of benchmarks/time_to_target.py and long_lm.py against hand-computed answers."""

import math

import pytest

from benchmarks import long_lm
from benchmarks import time_to_target as ttt


def test_fit_tradeoff_recovers_an_exact_curve() -> None:
    sizes = [16, 32, 64, 128, 256]
    steps = [600 + 20_000 / b for b in sizes]  # S = S_min + E_min / B
    s_min, e_min = ttt.fit_tradeoff(sizes, steps)
    assert s_min == pytest.approx(600) and e_min == pytest.approx(20_000)
    # on the curve, (S/S_min - 1)(E/E_min - 1) = 1 with E = B S
    for b, s in zip(sizes, steps):
        assert (s / s_min - 1) * (b * s / e_min - 1) == pytest.approx(1.0)
    assert ttt.curve_steps(2 * e_min, s_min, e_min) == pytest.approx(2 * s_min)
    assert ttt.curve_steps(e_min, s_min, e_min) == math.inf


def test_first_reach_needs_consecutive_evaluations() -> None:
    curve = [{"metric": m, "samples": i} for i, m in enumerate([0.5, 0.91, 0.4, 0.92, 0.93, 0.95])]
    assert ttt.first_reach(curve, 0.9, True, sustain=2)["samples"] == 3  # the 0.91 spike is ignored
    assert ttt.first_reach(curve, 0.9, True, sustain=1)["samples"] == 1
    assert ttt.first_reach(curve, 0.99, True, sustain=1) is None
    assert not ttt.meets(float("nan"), 0.0, False)


def test_long_lm_reach_interpolates_between_evaluations() -> None:
    curve = [{"step": 10 * i, "samples": 160 * i, "wall_s": 1.0 * i, "loss": loss}
             for i, loss in enumerate([3.0, 2.0, 1.6, 1.2, 1.5])]
    # 1.5 lies a quarter of the way from 1.6 (step 20) to 1.2 (step 30)
    assert long_lm.reach(curve, 1.5) == pytest.approx({"step": 22.5, "samples": 360.0, "wall_s": 2.25})
    assert long_lm.reach(curve, 3.5) == {"step": 0, "samples": 0, "wall_s": 0.0}  # met at the first eval
    assert long_lm.reach(curve, 1.0) is None
    curve[1]["loss"] = None  # a diverged evaluation never counts
    assert long_lm.reach(curve, 1.9)["step"] == pytest.approx(0 + 20 * (3.0 - 1.9) / (3.0 - 1.6))


def test_long_lm_growth_compares_first_5_and_last_10_percent_of_ready_values() -> None:
    noise = [math.nan] * 7 + [2.0] * 5 + [5.0] * 75 + [40.0] * 10 + [math.nan]  # 90 ready values
    g = long_lm.growth(noise)
    assert (g["first"], g["last"], g["growth"], g["ready_steps"]) == (2.0, 40.0, 20.0, 90)
    assert long_lm.growth([1.0] * 19) is None  # too few ready steps to say
