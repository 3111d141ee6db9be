"""The plain maths of benchmarks/time_to_target.py against hand-computed answers."""

import math

import pytest

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
