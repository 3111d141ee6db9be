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


def _staggered_worker(path: str, seed: int, wait_for, started, hold_until) -> None:
    """A tune_lr worker that starts once the worker before it is inside its first trial, and
    holds its own first trial until the next worker has started: worker k then finds exactly
    k trials in the study when it seeds its sampler."""
    torch.set_num_threads(1)
    from autobatch.tune import _trial

    train, first = _trial.train, [True]

    def held(*args, **kwargs):
        if first[0]:
            first[0] = False
            started.set()
            if hold_until is not None:
                assert hold_until.wait(timeout=60)
        return train(*args, **kwargs)

    _trial.train = held  # this forked process only
    if wait_for is not None:
        assert wait_for.wait(timeout=60)
    ex = get_problem("synthetic", num_train=128, num_val=256)
    tune_lr(ex.model_fn, ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data, n_trials=3, trial_length=1,
            lr_range=(0.01, 0.5), optimizer=ex.optimizer, storage=f"sqlite:///{path}", study_name="spread",
            config={"initial_batch_size": B0}, seed=seed, n_evals=2)


@pytest.mark.slow  # ~10 s: three processes, nine trials
def test_workers_with_their_own_seeds_never_train_the_same_lr_twice(tmp_path):
    # Seeds 3, 2 and 1 starting after 0, 1 and 2 trials: seed + trials gave all three the
    # sampler stream of seed 3, and the same LRs.
    path = str(tmp_path / "spread.db")
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # import torch._dynamo once, before forking
    ctx = multiprocessing.get_context("fork")
    started = [ctx.Event() for _ in range(3)]
    procs = [ctx.Process(target=_staggered_worker,
                         args=(path, 3 - k, started[k - 1] if k else None, started[k], started[k + 1] if k < 2 else None))
             for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    trials = optuna.load_study(study_name="spread", storage=f"sqlite:///{path}").trials
    assert len(trials) == 9 and all(t.state.is_finished() for t in trials)
    lrs = [t.params["lr"] for t in trials]
    assert len(set(lrs)) == len(lrs), sorted(lrs)


def test_sampler_seeds_differ_for_every_seed_and_trial_count():
    from autobatch.tune._trial import sampler_seed

    seeds = {sampler_seed(seed, count) for seed in range(50) for count in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**32 for s in seeds)
    assert sampler_seed(1, 1) != sampler_seed(2, 0) and sampler_seed(7, 3) == sampler_seed(7, 3)


def _sleeping_search(name: str) -> str:
    """A child's script: a study whose one trial prints "trial running" and sleeps (its
    process killed or stopped there by the test)."""
    return f"""
import sys, time
from autobatch.registry import get_problem
from autobatch.tune.study import search
ex = get_problem("synthetic", num_train=64, num_val=64)

def space(trial):
    lr = trial.suggest_float("lr", 0.01, 0.1, log=True)
    print("trial running", flush=True)
    time.sleep(600)
    return {{"lr": lr}}

search(ex.model_fn, ex.train_data, space=space, loss_fn=ex.loss_fn, val_data=ex.val_data,
       n_trials=1, trial_length=1, optimizer=ex.optimizer, storage=sys.argv[1], study_name={name!r},
       n_evals=2, seed=0)
"""


@pytest.mark.slow  # ~5 s: a child process started, killed, then the study resumed
def test_a_trial_of_a_process_killed_on_this_host_is_marked_failed_at_once_on_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    ex = get_problem("synthetic", num_train=64, num_val=64)
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    child = subprocess.Popen([sys.executable, "-c", _sleeping_search("dead"), url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "trial running"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)  # reaped: its PID names no process now
    assert child.returncode == -signal.SIGKILL
    (before,) = optuna.load_study(study_name="dead", storage=url).trials
    assert before.state.name == "RUNNING"
    # resumed at once, well inside the heartbeat's 60 s grace period
    resumed = search(ex.model_fn, ex.train_data, space=lambda t: {"lr": t.suggest_float("lr", 0.01, 0.1, log=True)},
                     loss_fn=ex.loss_fn, val_data=ex.val_data, n_trials=1, trial_length=1, optimizer=ex.optimizer,
                     storage=url, study_name="dead", n_evals=2, seed=0)
    assert [(row.number, row.state) for row in resumed.trials] == [(0, "FAIL"), (1, "COMPLETE")]
    host = os.uname().nodename
    assert (before.user_attrs["host"], before.user_attrs["pid"]) == (host, child.pid)
    assert resumed.trials[0].reason == f"dead: its process (PID {child.pid} on {host}) is gone; marked FAIL on resume"
    assert "dead: its process" in resumed.table().splitlines()[1]
    assert resumed.trials[1].params["lr"] != before.params["lr"]


def test_only_this_hosts_trials_of_gone_processes_are_failed_at_once(tmp_path):
    import subprocess
    import sys

    from autobatch.tune._process import fail_dead_trials, record_process

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    gone_pid = int(gone.stdout)  # reaped: no process has this PID (unless one just reused it)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'hosts.db'}", study_name="hosts")
    trials = [study.ask() for _ in range(4)]
    for trial in trials:
        record_process(trial)
    trials[0].set_user_attr("pid", gone_pid)  # this host, process gone: failed at once
    trials[1].set_user_attr("pid", gone_pid)
    trials[1].set_user_attr("host", "another-machine")  # another host: left to the heartbeat
    trials[2].set_user_attr("pid", gone_pid)
    trials[2].set_user_attr("pid_namespace", "pid:[1]")  # another container of this host: the same
    # trials[3]: this very process, alive
    assert fail_dead_trials(study) == [0]
    states = [t.state.name for t in optuna.load_study(study_name="hosts", storage=study._storage).trials]
    assert states == ["FAIL", "RUNNING", "RUNNING", "RUNNING"]
    assert study.trials[0].user_attrs["reason"].startswith(f"dead: its process (PID {gone_pid} on ")
    assert fail_dead_trials(study) == []  # nothing twice


@pytest.mark.slow  # ~15 s: a child that trains until its first evaluations
def test_sigterm_during_a_trial_marks_it_failed_with_the_reason_and_exits_143(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    url = f"sqlite:///{tmp_path / 'term.db'}"
    worker = f"""
import sys
from autobatch.registry import get_problem
from autobatch.tune.study import tune_lr
ex = get_problem("synthetic", num_train=256, num_val=64)
tune_lr(ex.model_fn, ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data, n_trials=2, trial_length=10**5,
        trial_unit="samples", lr_range=(0.01, 0.1), optimizer=ex.optimizer, storage=sys.argv[1], study_name="term",
        n_evals=50, seed=0, config={{"initial_batch_size": {B0}, "policy": "fixed"}})
"""
    child = subprocess.Popen([sys.executable, "-c", worker, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the first trial has reported: inside fit
            try:
                training = [t for t in optuna.load_study(study_name="term", storage=url).trials
                            if t.state.name == "RUNNING" and t.intermediate_values]
            except KeyError:  # the study is not created yet
                training = []
            if training:
                break
            time.sleep(0.1)
        assert training, "the child never reported a first evaluation"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert "Traceback" not in err, err
    (trial,) = optuna.load_study(study_name="term", storage=url).trials
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["reason"] == "terminated: SIGTERM during the trial; the process exited with status 143"
    assert 2000 <= trial.user_attrs["samples"] < 10**5  # stopped in the middle of its fit
