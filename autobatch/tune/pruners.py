"""The named Optuna pruners of :data:`autobatch.registry.PRUNERS`, each built for the number of
validation reports a trial makes (``n_evals``). Imported only when a study builds one."""

from __future__ import annotations

import optuna

__all__ = ["halving", "hyperband", "median", "no_pruning"]


def median(n_evals: int) -> optuna.pruners.BasePruner:
    """Optuna's median rule after 4 finished trials, judging from the second quarter on."""
    # Warm-up: the first quarter of the budget is never judged (early losses rank LRs badly:
    # a small LR looks fine before a large one has had time to pass it).
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, n_evals // 4))


def hyperband(n_evals: int) -> optuna.pruners.BasePruner:
    """Hyperband over 1..``n_evals`` reports, keeping a third at each rung."""
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_evals, reduction_factor=3)


def halving(n_evals: int) -> optuna.pruners.BasePruner:
    """Asynchronous successive halving with rungs at reports 1, 3, 9...: a trial goes on past a
    rung only if it is in the best third there. Reports come at equal numbers of examples, so
    a rung compares trials at equal cost whatever their batch sizes did."""
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


def no_pruning(n_evals: int) -> optuna.pruners.BasePruner:
    """Every trial runs to the end."""
    return optuna.pruners.NopPruner()
