"""SIGINT and SIGTERM during ``autobatch.fit``: stop between two steps, never inside one.

A signal that interrupts a step part-way leaves a state no checkpoint can describe: the
sample stream already past the step's examples, the BatchNorm statistics and the RNG moved
by its forward, maybe half the parameters updated, while the step and sample counters do not
count it yet. So while ``fit`` runs, :class:`DeferredSignals` catches both signals, lets the
step in flight finish (its evaluation and checkpoint included), and raises at the top of the
next iteration (:meth:`DeferredSignals.check`), where the state is exactly that of a
periodic checkpoint; ``fit`` then writes ``last.pt`` and re-raises. A resumed run continues
from there to the same weights and the same sample count as a run never interrupted. The
handlers stay installed through the final evaluation and save: a signal that arrives then is
raised once ``last.pt`` holds the complete run.

- SIGINT (Ctrl-C) -> ``KeyboardInterrupt``, as Python does by default. A second Ctrl-C
  before the step ends raises at once (a step that hangs can still be left); ``fit`` then
  writes no checkpoint if a step was in flight, so ``last.pt`` stays the previous consistent
  one.
- SIGTERM (how clusters preempt jobs) -> :class:`Preempted`, a ``SystemExit`` with status
  143 (128 + 15, what a shell reports for a process ended by SIGTERM): uncaught, the process
  exits without a traceback after the checkpoint is written.

Handlers are installed only from the main thread (Python delivers signals there only), only
over Python's defaults (a handler of the user's own is left alone), and the previous ones
are put back when ``fit`` ends. Under ``torchrun`` every rank must stop at the same step: each
rank's pending signal rides in the step's gradient all-reduce (:meth:`DeferredSignals.flags`,
summed over ranks), so the ranks agree without a collective or host sync of their own; a
signal that arrives after a rank's all-reduce is agreed on in the next step's.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

from autobatch.train.distributed import DistInfo, agree_max
from autobatch.train.sampler import SampleStream

__all__ = ["DeferredSignals", "Preempted", "no_step_in_flight"]


class Preempted(SystemExit):
    """Raised by ``fit`` after SIGTERM, once ``last.pt`` is written: exit status 143."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class DeferredSignals:
    """Hold SIGINT and SIGTERM until the step in flight is done (see the module docstring).

    Args:
        info: this process's place in a data-parallel run (ranks agree on a stop).
        device: where the agreement's all-reduce runs.
    """

    def __init__(self, info: DistInfo, device: torch.device) -> None:
        self.info, self.device = info, device
        self.pending: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pending == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: leave now
        self.pending = self.pending or signum

    def flags(self) -> tuple[float, float]:
        """``(SIGTERM, SIGINT)`` pending on this rank, each 0 or 1: what the step's all-reduce
        sums over ranks for :meth:`check`."""
        return float(self.pending == signal.SIGTERM), float(self.pending == signal.SIGINT)

    def check(self, agreed: tuple[float, float] | None = None) -> None:
        """Raise for a signal received since the last call (between two steps only).

        Args:
            agreed: under data parallelism, :meth:`flags` summed over ranks by the last step's
                all-reduce; None: agree with a small all-reduce of its own (before the first
                step, after the last). Every rank stops at the same step, or one waits forever.

        Raises:
            KeyboardInterrupt: after SIGINT (on any rank).
            Preempted: after SIGTERM (on any rank; it wins over SIGINT).
        """
        pending = self.pending or 0
        if self.info.enabled and agreed is None:
            pending = int(agree_max(pending, self.info, self.device))
        elif self.info.enabled:
            pending = signal.SIGTERM if agreed[0] > 0 else signal.SIGINT if agreed[1] > 0 else 0
        if pending:
            self.pending = None
            raise Preempted() if pending == signal.SIGTERM else KeyboardInterrupt

    def close(self) -> None:
        """Put the previous handlers back; a signal still pending is raised by :meth:`check`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous = {}


def no_step_in_flight(stream: SampleStream, samples: int) -> bool:
    """Whether ``samples`` (examples counted by finished steps, global) is every example the
    stream handed out: then model, stream, RNG and counters describe the same moment."""
    return stream.epoch * stream.num_examples + stream.position == samples
