"""What a study trial scores: one number from the validation losses measured along a run.

A trial evaluates the validation loss ``n_evals`` times, at equal numbers of examples
processed. Its score, reported after every evaluation (so a pruner can compare trials that
have trained on the same number of examples) and returned at the end, is one of:

- ``"tail"`` (the default): the mean of the last ``tail_window(n_evals)`` evaluations (2 of
  8). A run at a fixed LR without decay ends with a loss that swings from one evaluation to
  the next; averaging the last few halves the weight of one unlucky evaluation without
  rewarding a run for a good moment it did not keep.
- ``"final"``: the last evaluation, what a plain fit of that length ends with.
- ``"best"``: the lowest evaluation so far, what early stopping would keep.

Measured on the tune benchmark (``docs/benchmarks/tune.md``): how well each score of one
run predicts the mean final loss of the same LR over fresh seeds, and the LR it picks. An
evaluation of an exponential moving average of the weights was measured too and rejected:
it is steadier but favours LRs too large for the raw weights a fit returns.

Plain functions over floats, so a test can check them by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "best", "final", "score", "tail", "tail_window"]


def tail_window(n_evals: int) -> int:
    """How many of the last evaluations ``"tail"`` averages: a quarter of ``n_evals``, at
    least 2 (and never more than ``n_evals``)."""
    return max(1, min(n_evals, max(2, n_evals // 4)))


def final(values: Sequence[float], n_evals: int) -> float:
    """The last value."""
    return float(values[-1])


def best(values: Sequence[float], n_evals: int) -> float:
    """The lowest value."""
    return float(min(values))


def tail(values: Sequence[float], n_evals: int) -> float:
    """The mean of the last :func:`tail_window` ``(n_evals)`` values (fewer while a trial has
    made fewer evaluations)."""
    window = list(values[-tail_window(n_evals):])
    return math.fsum(window) / len(window)


#: objective name -> ``score(values, n_evals)``: the validation losses so far (oldest first) -> a
#: trial's score (lower is better)
OBJECTIVES: dict[str, Callable[[Sequence[float], int], float]] = {
    "tail": tail,
    "final": final,
    "best": best,
}

DEFAULT_OBJECTIVE = "tail"


def score(objective: str, values: Sequence[float], n_evals: int) -> float:
    """A trial's score under ``objective`` from its validation losses so far.

    Args:
        objective: a name in :data:`OBJECTIVES`.
        values: validation losses (mean-reduced), oldest first; at least one.
        n_evals: the evaluations a complete trial makes (sets ``"tail"``'s window).

    Raises:
        ValueError: for an unknown objective or no value.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)} (got objective={objective!r})")
    if not values:
        raise ValueError("a score needs at least one validation loss (got none)")
    return OBJECTIVES[objective](values, n_evals)
