"""Studies shared by processes: two processes (forked) on one fresh study, and a trial whose
process was killed (SIGKILL, a subprocess) marked failed when the study resumes."""

from __future__ import annotations

import multiprocessing

import optuna
import pytest
import torch

from autobatch.registry import get_problem
from autobatch.tune.study import search, tune_lr

B0 = 16


def _worker(storage_kind: str, path: str, seed: int, barrier) -> None:
    torch.set_num_threads(1)
    if storage_kind == "sqlite":
        storage = f"sqlite:///{path}"
    else:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    ex = get_problem("synthetic", num_train=128, num_val=256)
    barrier.wait(timeout=60)  # both create-or-load the study at the same moment
    tune_lr(ex.model_fn, ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data, n_trials=4, trial_length=2,
            lr_range=(0.01, 0.5), optimizer=ex.optimizer, storage=storage, study_name="shared",
            config={"initial_batch_size": B0}, seed=seed, n_evals=2)


@pytest.mark.parametrize("storage_kind", ["sqlite", "journal"])
def test_two_processes_share_a_study(storage_kind, tmp_path):
    path = str(tmp_path / ("s.db" if storage_kind == "sqlite" else "s.log"))
    # Building a first optimizer imports torch._dynamo (seconds); do it once here, so the
    # forked children (two real processes, without re-importing torch) inherit it.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(storage_kind, path, seed, barrier)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    storage = f"sqlite:///{path}" if storage_kind == "sqlite" else optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(path))
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert sorted(t.number for t in trials) == list(range(8))  # 4 + 4, none lost or doubled
    assert all(t.state.is_finished() for t in trials)
    assert len({t._trial_id for t in trials}) == 8


_KILLED_WORKER = """
import sys, time
import autobatch.tune._trial as trial_mod
trial_mod.HEARTBEAT_INTERVAL_S, trial_mod.GRACE_PERIOD_S = 1, 2
from autobatch.registry import get_problem
from autobatch.tune.study import search
ex = get_problem("synthetic", num_train=64, num_val=64)

def space(trial):
    lr = trial.suggest_float("lr", 0.01, 0.1, log=True)
    print("trial running", flush=True)
    time.sleep(600)  # killed here, mid-trial
    return {"lr": lr}

search(ex.model_fn, ex.train_data, space=space, loss_fn=ex.loss_fn, val_data=ex.val_data,
       n_trials=1, trial_length=1, optimizer=ex.optimizer, storage=sys.argv[1], study_name="killed",
       n_evals=2, seed=0)
"""


@pytest.mark.slow  # ~7 s: a subprocess, then waiting out a 2 s heartbeat grace period
def test_a_trial_of_a_killed_process_is_marked_failed_when_the_study_resumes(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    from autobatch.tune import _trial

    ex = get_problem("synthetic", num_train=64, num_val=64)  # as in the worker
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WORKER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "trial running"
        time.sleep(1.5)  # at least one heartbeat written by the trial's thread
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    before = optuna.load_study(study_name="killed", storage=url).trials
    assert [t.state.name for t in before] == ["RUNNING"]  # what a dead process leaves behind
    time.sleep(3.5)  # past the 2 s grace period (SQLite timestamps are whole seconds)

    monkeypatch.setattr(_trial, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(_trial, "GRACE_PERIOD_S", 2)
    resumed = search(ex.model_fn, ex.train_data, space=lambda t: {"lr": t.suggest_float("lr", 0.01, 0.1, log=True)},
                     loss_fn=ex.loss_fn, val_data=ex.val_data, n_trials=1, trial_length=1, optimizer=ex.optimizer,
                     storage=url, study_name="killed", n_evals=2, seed=0)
    assert [(row.number, row.state) for row in resumed.trials] == [(0, "FAIL"), (1, "COMPLETE")]
    assert resumed.trials[0].reason.startswith("stale: process died (no heartbeat for > 2 s)")
    assert resumed.trials[0].params == {"lr": before[0].params["lr"]}
    print(resumed.table())
    dead_line = resumed.table().splitlines()[1]
    assert dead_line.split()[:2] == ["0", "fail"] and "stale: process died" in dead_line
    stored = optuna.load_study(study_name="killed", storage=url).trials
    assert not [t for t in stored if t.state.name == "RUNNING"]
