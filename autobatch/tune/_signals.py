"""SIGTERM during a study: the trial in flight ends FAIL with its reason, and the process exits
with status 143, as ``fit`` does when preempted.

``fit`` turns SIGTERM into :class:`~autobatch.train._interrupt.Preempted` (a ``SystemExit``)
after the step in flight. Optuna records a trial that raises ``KeyboardInterrupt`` (SIGINT) as
FAIL, but lets a ``SystemExit`` through without a word, so the trial stayed RUNNING; and a
SIGTERM outside ``fit`` (building the model, the last evaluation, the sampler) ended the
process where it stood. :class:`StudySignals` closes both gaps:

- in a one-process study it handles SIGTERM while the study runs (main thread, over the
  default handler only): inside a trial it raises ``Preempted`` at once (a stopped trial is
  thrown away: no step needs finishing, no checkpoint is kept), between trials it lets Optuna
  record the trial just run and stops after it (:meth:`StudySignals.after_trial`);
- :meth:`StudySignals.trial` marks the trial FAIL with its ``reason`` on ``Preempted``, also
  under torchrun (where no handler is installed: ``fit`` stops every rank after the same
  step), and notes the reason of a SIGINT, which Optuna then marks FAIL.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import optuna

from autobatch.train._interrupt import Preempted

__all__ = ["StudySignals"]

_TERMINATED = "terminated: SIGTERM during the trial; the process exited with status 143"
_INTERRUPTED = "interrupted: SIGINT (Ctrl-C) during the trial"


class StudySignals:
    """SIGTERM for the length of one ``study.optimize`` (module docstring): wrap each trial's
    objective in :meth:`trial`, pass :meth:`after_trial` to ``optimize`` as a callback, and
    run ``optimize`` inside :meth:`installed`."""

    def __init__(self) -> None:
        self.pending = False  # SIGTERM received between trials
        self._in_trial = False

    @contextlib.contextmanager
    def installed(self, install: bool) -> Iterator[None]:
        """Handle SIGTERM inside the block (``install``: a one-process study; False leaves it
        to ``fit``, as under torchrun), then put the previous handler back and raise
        ``Preempted`` for a SIGTERM still pending."""
        previous: Any = None
        if install and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if self.pending:
                self.pending = False
                raise Preempted()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._in_trial:
            self._in_trial = False  # a second SIGTERM waits while the trial is marked
            raise Preempted()
        self.pending = True

    @contextlib.contextmanager
    def trial(self, trial: optuna.Trial | Any) -> Iterator[None]:
        """Run one trial's objective: on ``Preempted`` mark ``trial`` FAIL (its ``reason``
        says why) before it propagates; on ``KeyboardInterrupt`` note the reason."""
        try:
            if self.pending:  # received while Optuna opened this trial
                self.pending = False
                raise Preempted()
            self._in_trial = True
            yield
        except Preempted:
            self._in_trial = False
            if isinstance(trial, optuna.Trial):  # rank 0's; other ranks' trials are copies
                trial.set_user_attr("reason", _TERMINATED)
                trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        except KeyboardInterrupt:
            self._in_trial = False
            trial.set_user_attr("reason", _INTERRUPTED)
            raise
        finally:
            self._in_trial = False

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback, after each trial is recorded: stop for a SIGTERM received since."""
        if self.pending:
            self.pending = False
            raise Preempted()
