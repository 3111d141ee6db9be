"""Which process runs a trial, so that a trial whose process is gone is known dead at once.

The heartbeat (:mod:`autobatch.tune._trial`) finds the trials of a dead process on any
machine, but only once it has been silent for the grace period (60 s). A process on this
machine can be asked directly: every trial records the host name, PID and PID namespace of
the process running it (user attributes ``host``, ``pid`` and ``pid_namespace``), and when a
study resumes, a RUNNING trial recorded by this host and PID namespace whose PID no longer
exists is marked FAIL at once, its ``reason`` naming the process. Trials of other hosts (or
containers with their own PID namespace, which may share the host name) are left to the
heartbeat. A PID reused by a new process keeps the trial RUNNING until the heartbeat rule
takes it: the check errs towards "alive".
"""

from __future__ import annotations

import os
import socket

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

__all__ = ["fail_dead_trials", "record_process"]


def _identity() -> dict[str, object]:
    """This process: host name, PID, and its PID namespace (Linux; None elsewhere)."""
    try:
        namespace: str | None = os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": namespace}


def record_process(trial: optuna.Trial) -> None:
    """Note on ``trial`` the process that runs it (user attributes ``host``, ``pid`` and
    ``pid_namespace``)."""
    for key, value in _identity().items():
        trial.set_user_attr(key, value)


def _gone(pid: int) -> bool:
    """Whether no process ``pid`` exists here (POSIX; elsewhere nothing is known: False)."""
    if os.name != "posix":  # on Windows os.kill(pid, 0) would terminate the process
        return False
    try:
        os.kill(pid, 0)  # signal 0: the existence and permission checks only
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials that this host's processes ran and whose process is gone.

    Returns:
        The numbers of the trials marked (a trial another process marked first is skipped).
    """
    me = _identity()
    marked = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        pid = attrs.get("pid")
        same_place = attrs.get("host") == me["host"] and attrs.get("pid_namespace") == me["pid_namespace"]
        if not (same_place and isinstance(pid, int) and pid != me["pid"] and _gone(pid)):
            continue
        try:
            study._storage.set_trial_user_attr(
                trial._trial_id, "reason",
                f"dead: its process (PID {pid} on {me['host']}) is gone; marked FAIL on resume",
            )
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another process resuming the study marked it first
        marked.append(trial.number)
    return marked
