"""autobatch.tune: LR studies against a dense grid and the curvature bound, resumption,
divergence, search spaces and the error messages (studies shared by processes:
tests/subprocess/test_study_processes.py)."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch

import autobatch
from autobatch.registry import get_problem
from autobatch.tune.study import search, tune_lr

B0 = 16


@pytest.fixture(scope="module")
def ex():
    # Small and well conditioned enough to train in a few dozen steps; inputs have variances
    # in [0.01, 1] and the bias input is 1.
    return get_problem("synthetic", num_train=256, num_val=1024, min_variance=0.01)


def _tune(ex, **kw):
    args = dict(loss_fn=ex.loss_fn, val_data=ex.val_data, trial_length=4, optimizer=ex.optimizer,
                storage=optuna.storages.InMemoryStorage(), config={"initial_batch_size": B0}, seed=0)
    args.update(kw)
    return tune_lr(ex.model_fn, ex.train_data, **args)


def _grid_loss(ex, lr: float, epochs: float = 4) -> float:
    """The same adaptive-batch fit a trial runs, outside Optuna, scored the same way."""
    try:
        result = autobatch.fit(ex.model_fn(), ex.train_data, loss_fn=ex.loss_fn, optimizer=ex.optimizer,
                               lr=lr, max_samples=round(epochs * 256), initial_batch_size=B0, progress=False)
    except FloatingPointError:
        return math.inf
    loss = ex.evaluate(result.model, ex.val_data)["val_loss"]
    return loss if math.isfinite(loss) else math.inf


def test_best_lr_within_3x_of_the_dense_grid_and_the_curvature_bound(ex):
    # Reference 1, by brute force: a log grid (x1.6 steps) of full-budget fits.
    grid = np.logspace(-2, math.log10(2.0), 12)
    losses = [_grid_loss(ex, lr) for lr in grid]
    grid_lr = float(grid[int(np.argmin(losses))])
    # Reference 2, by theory: the loss Hessian is 2 E[(x,1)(x,1)^T] = 2 diag(v, 1), whose
    # largest eigenvalue is L = 2; gradient descent diverges above 2/L = 1, and 1/L = 0.5 is
    # the classical safe, fast choice.
    assert grid_lr / 3 <= 0.5 <= grid_lr * 3
    assert max(losses[int(np.searchsorted(grid, 1.2)):]) == math.inf  # and it does diverge above 1

    result = _tune(ex, n_trials=12, lr_range=(1e-3, 10.0), objective="final")
    assert len(result.trials) == 12
    assert grid_lr / 3 <= result.best_lr <= grid_lr * 3
    assert result.best_value <= 1.1 * min(losses)
    # best_value is the final validation loss of the best trial, as a plain fit measures it.
    assert result.best_value == pytest.approx(_grid_loss(ex, result.best_lr), rel=1e-4)
    # Pruned trials stopped early: the study cost less than 12 full budgets.
    assert result.total_samples < 12 * 4 * 256
    pruned = [row for row in result.trials if row.state == "PRUNED"]
    assert pruned and all(row.samples < 4 * 256 and row.reason for row in pruned)


def test_resume_adds_trials_to_the_same_study(ex, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    kw = dict(lr_range=(0.05, 0.5), storage=url, study_name="resume", n_evals=2, trial_length=2)
    first = _tune(ex, n_trials=2, **kw)
    second = _tune(ex, n_trials=3, **kw)
    assert [row.number for row in first.trials] == [0, 1]
    assert [row.number for row in second.trials] == [0, 1, 2, 3, 4]
    # The first call's trials are the stored ones, untouched; the resumed sampler does not
    # replay the first call's random start-up points.
    assert [row.params for row in second.trials[:2]] == [row.params for row in first.trials]
    assert len({row.params["lr"] for row in second.trials}) == 5
    stored = optuna.load_study(study_name="resume", storage=url)
    assert len(stored.trials) == 5
    with pytest.raises(ValueError, match=r"other trials \(trial_samples: study has 512, this call 256\)"):
        _tune(ex, n_trials=1, **{**kw, "trial_length": 1})



def test_diverging_lrs_are_pruned_with_the_reason_and_the_study_goes_on(ex):
    result = _tune(ex, n_trials=8, lr_range=(0.05, 50.0), pruner="none")
    assert len(result.trials) == 8
    diverged = [row for row in result.trials if row.reason and row.reason.startswith("diverged")]
    assert diverged, result.table()
    # Plain GD diverges above 1 on this problem (see the first test); every trial that
    # diverged had an LR near or above that, and it is pruned, not failed.
    assert all(row.state == "PRUNED" and row.params["lr"] > 0.7 for row in diverged)
    assert any("non-finite" in row.reason or "val_loss=inf" in row.reason or "val_loss=nan" in row.reason
               for row in diverged)
    assert result.best_lr is not None and result.best_lr < 1.0
    assert all(math.isnan(t.intermediate_values[max(t.intermediate_values)])
               for t in result.study.trials if t.user_attrs.get("diverged"))


def test_all_trials_diverging_returns_no_best_with_a_warning(ex):
    with pytest.warns(UserWarning, match=r"no trial of study .* completed \(3 trials: 3 diverged\)"):
        result = _tune(ex, n_trials=3, lr_range=(100.0, 1e4))
    assert result.best_lr is None and result.best_value is None
    assert [row.state for row in result.trials] == ["PRUNED"] * 3


def test_search_routes_each_key_to_fit_config_or_optimizer(ex):
    seen = []

    class SpySGD(torch.optim.SGD):
        def __init__(self, params, lr, momentum=0.0):
            seen.append(momentum)
            super().__init__(params, lr=lr, momentum=momentum)

    def space(trial):
        return {
            "lr": trial.suggest_float("lr", 0.02, 0.2, log=True),
            "momentum": trial.suggest_float("momentum", 0.0, 0.9),
            "initial_batch_size": trial.suggest_categorical("initial_batch_size", [8, 32]),
        }

    result = search(ex.model_fn, ex.train_data, space=space, loss_fn=ex.loss_fn, val_data=ex.val_data,
                    n_trials=4, trial_length=1, optimizer=SpySGD, storage=optuna.storages.InMemoryStorage(),
                    config={"policy": "fixed"}, seed=0, pruner="none")
    rows = result.trials
    assert seen == [row.params["momentum"] for row in rows]
    # A fixed batch of B over 256 examples is 256 / B steps: the batch size reached fit.
    assert [row.steps for row in rows] == [256 // row.params["initial_batch_size"] for row in rows]
    assert result.best_lr == result.best_params["lr"]
    with pytest.raises(ValueError, match=r"returned \['momentun'\], which is neither .* SGD"):
        search(ex.model_fn, ex.train_data, space=lambda t: {"lr": 0.1, "momentun": 0.9},
               loss_fn=ex.loss_fn, val_data=ex.val_data, n_trials=1, trial_length=1,
               storage=optuna.storages.InMemoryStorage())


def test_objectives_score_the_evaluations_as_named(ex):
    final = _tune(ex, n_trials=3, lr_range=(0.3, 0.9), pruner="none", n_evals=4, objective="final")
    best = _tune(ex, n_trials=3, lr_range=(0.3, 0.9), pruner="none", n_evals=4, objective="best")
    tail = _tune(ex, n_trials=3, lr_range=(0.3, 0.9), pruner="none", n_evals=4)  # the default
    for f, b, t in zip(final.study.trials, best.study.trials, tail.study.trials):
        assert f.params == b.params == t.params  # same seed, same LRs, same training
        raw = [f.intermediate_values[k] for k in range(1, 5)]
        assert f.value == raw[-1]
        assert b.value == min(raw)
        assert [b.intermediate_values[k] for k in range(1, 5)] == list(np.minimum.accumulate(raw))
        # "tail" with 4 evaluations averages the last 2 measured so far
        assert [t.intermediate_values[k] for k in range(1, 5)] == pytest.approx(
            [raw[0], (raw[0] + raw[1]) / 2, (raw[1] + raw[2]) / 2, (raw[2] + raw[3]) / 2], rel=1e-12)
        assert t.value == pytest.approx((raw[2] + raw[3]) / 2, rel=1e-12)
    with pytest.raises(ValueError, match=r"objective must be one of \('tail', 'final', 'best'\) \(got objective='last'\)"):
        _tune(ex, n_trials=1, objective="last")


def test_hyperband_pruner_and_plot(ex, tmp_path):
    result = _tune(ex, n_trials=5, lr_range=(1e-3, 0.5), pruner="hyperband", trial_length=2)
    assert isinstance(result.study.pruner, optuna.pruners.HyperbandPruner)
    path = result.plot(tmp_path / "tune.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.table().splitlines()
    assert table[0].split()[:3] == ["#", "state", "lr"] and len(table) == 6


def test_the_trials_as_a_dataframe_match_the_table(ex, monkeypatch):
    pd = pytest.importorskip("pandas")
    result = _tune(ex, n_trials=4, lr_range=(1e-3, 0.5), trial_length=2)
    frame = result.to_pandas()
    assert list(frame.columns) == ["number", "state", "value", "lr", "samples", "steps", "final_batch_size", "reason",
                                   "wall_time_s"]
    assert frame["number"].tolist() == [row.number for row in result.trials]
    assert frame["lr"].tolist() == [row.params["lr"] for row in result.trials]
    best = frame.loc[frame["value"].idxmin()]
    assert best["lr"] == result.best_lr and best["value"] == result.best_value
    assert isinstance(frame, pd.DataFrame)
    monkeypatch.setitem(__import__("sys").modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match=r'TuneResult.to_pandas needs pandas: pip install "torch-autobatch\[pandas\]"'):
        result.to_pandas()


def test_bad_inputs_get_clear_errors(ex):
    with pytest.raises(ValueError, match=r"low < high \(got lr_range=\(1.0, 0.001\)\); swap them"):
        _tune(ex, n_trials=1, lr_range=(1.0, 1e-3))
    with pytest.raises(ValueError, match=r"two positive finite LRs \(got lr_range=\(0.0, 1.0\)\)"):
        _tune(ex, n_trials=1, lr_range=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"n_trials must be an integer >= 1 \(got n_trials=0\)"):
        _tune(ex, n_trials=0)
    # every problem of one call at once
    with pytest.raises(ValueError, match=r"lr_range.*; n_trials must be .*; trial_length must be a positive"):
        _tune(ex, n_trials=0, lr_range=(-1.0, 1.0), trial_length=0)
    with pytest.raises(ValueError, match=r"storage 'studies.db' is not a URL .* 'sqlite:///"):
        _tune(ex, n_trials=1, storage="studies.db")
    with pytest.raises(ValueError, match=r"cannot open storage 'nosuchdb://x/y' \(.*\); give a database URL"):
        _tune(ex, n_trials=1, storage="nosuchdb://x/y")
    with pytest.raises(ValueError, match=r"unknown pruner 'medain'; allowed: halving, hyperband, median, none"):
        _tune(ex, n_trials=1, pruner="medain")
    net = ex.model_fn()
    with pytest.raises(ValueError, match=r"model_fn returned the same Linear object twice .* build it inside"):
        tune_lr(lambda: net, ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data, n_trials=2, trial_length=1,
                optimizer=ex.optimizer, storage=optuna.storages.InMemoryStorage(), lr_range=(0.01, 0.1))
    layer = torch.nn.Linear(16, 1)
    with pytest.raises(ValueError, match=r"parameters \['0.weight', '0.bias'\] belong to a model it built before"):
        tune_lr(lambda: torch.nn.Sequential(layer), ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data,
                n_trials=2, trial_length=1, optimizer=ex.optimizer, storage=optuna.storages.InMemoryStorage(),
                lr_range=(0.01, 0.1))


@pytest.mark.parametrize("storage", [None, "sqlite://", "sqlite:///:memory:", "in-memory-object"])
def test_naming_a_study_in_an_in_memory_storage_warns(ex, storage):
    storage = optuna.storages.InMemoryStorage() if storage == "in-memory-object" else storage
    with pytest.warns(UserWarning, match=r"keeps study 'mine' in this process's memory: .* cannot be resumed"):
        result = _tune(ex, n_trials=1, storage=storage, study_name="mine", lr_range=(0.05, 0.5), trial_length=1)
    assert [row.state for row in result.trials] == ["COMPLETE"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unnamed: a throwaway study, no warning
        _tune(ex, n_trials=1, storage=storage, lr_range=(0.05, 0.5), trial_length=1)
