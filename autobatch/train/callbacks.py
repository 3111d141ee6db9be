"""Hooks into ``autobatch.fit``: a small base class and the stock callbacks.

A callback sees each finished step and each evaluation. To end training early, raise
:class:`StopTraining` from a hook: fit finishes cleanly (final evaluation, checkpoint) and
reports ``stopped_by="callback"``. Any other exception (for example ``optuna.TrialPruned``)
propagates to the caller unchanged. :class:`LogMetrics` is the callback that feeds the
``loggers`` setting's writers (:func:`setup_loggers` builds it).
"""

from __future__ import annotations

import atexit
import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from autobatch.loggers.base import Logger, eval_metrics, probe_metrics, step_metrics
from autobatch.registry import create

if TYPE_CHECKING:
    from autobatch.config import LogConfig
    from autobatch.memory.probe import MemoryProbeResult
    from autobatch.train.results import FitResult, StepRecord

__all__ = ["Callback", "LogMetrics", "StopAtTarget", "StopTraining", "setup_loggers"]


class StopTraining(Exception):
    """Raised by a callback to end a fit early and cleanly."""


class Callback:
    """Base class; override the hooks you need (all are no-ops here)."""

    def on_step_end(self, record: StepRecord) -> None:
        """After every optimizer step (skipped steps included, with ``record.skipped``)."""

    def on_eval(self, step: int, samples: int, metrics: dict[str, float]) -> None:
        """After every evaluation of ``val_data``; ``metrics`` has e.g. ``val_loss``."""

    def on_fit_end(self, result: FitResult) -> None:
        """Once, with the finished result."""


class StopAtTarget(Callback):
    """Stop when an evaluated metric reaches a target, and remember when it did.

    Args:
        metric: key in the evaluation metrics, e.g. ``"val_accuracy"``.
        target: the value to reach.
        mode: ``"max"`` (reach ``>= target``) or ``"min"`` (reach ``<= target``).
        stop: end training when reached (False only records the step).

    Attributes:
        reached_step, reached_samples: step and examples processed at the first evaluation
            that met the target (None until then).
    """

    def __init__(self, metric: str, target: float, *, mode: str = "max", stop: bool = True) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min' (got mode={mode!r})")
        self.metric, self.target, self.mode, self.stop = metric, target, mode, stop
        self.reached_step: int | None = None
        self.reached_samples: int | None = None

    def on_eval(self, step: int, samples: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise KeyError(
                f"StopAtTarget watches {self.metric!r}, but the evaluation gave "
                f"{sorted(metrics)}; pick one of those"
            )
        value = metrics[self.metric]
        hit = math.isfinite(value) and (value >= self.target if self.mode == "max" else value <= self.target)
        if hit and self.reached_step is None:
            self.reached_step, self.reached_samples = step, samples
        if hit and self.stop:
            raise StopTraining(f"{self.metric}={value:.4g} reached target {self.target}")


class LogMetrics(Callback):
    """Sends every step's figures, each evaluation's and the memory probe's to loggers, under
    the stable names of :mod:`autobatch.loggers.base`.

    Off the step's path: a step only appends its record to a list; the records go to the
    loggers in batches, every ``every_s`` seconds of the run (read from the records' own
    ``wall_time_s``: no clock is read per step), before each evaluation and at the end. A
    logger with a ``max_overhead`` is timed and writes only every so many steps when it is
    slower than that share of the run (the last step of each batch always).

    Args:
        loggers: the writers.
        tokens: also send ``train/tokens`` (the run counts loss items other than examples).
        probe: the memory probe's result, sent once at step 0 (None: the run did not probe).
        every_s: seconds of the run between two batches.
    """

    def __init__(self, loggers: Iterable[Logger], *, tokens: bool = False, probe: MemoryProbeResult | None = None,
                 every_s: float = 2.0) -> None:
        self.loggers = list(loggers)
        self.tokens, self.every_s = tokens, every_s
        self._gates = [_Gate(logger) for logger in self.loggers]
        self._pending: list[StepRecord] = []
        self._next_write = 0.0
        self._first = probe_metrics(probe) if probe is not None else None
        self._closed = False
        # A run ended by an exception (Ctrl-C) never reaches on_fit_end: write what is held at exit.
        atexit.register(self.close)

    def on_step_end(self, record: StepRecord) -> None:
        self._pending.append(record)
        if record.wall_time_s >= self._next_write:
            self._write()

    def on_eval(self, step: int, samples: int, metrics: dict[str, float]) -> None:
        self._write(extra=(eval_metrics(metrics), step))

    def on_fit_end(self, result: FitResult) -> None:
        self.close()

    def close(self) -> None:
        """Send what is held and close every logger (once)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._write()
        for logger in self.loggers:
            logger.close()

    def _write(self, extra: tuple[Mapping[str, float], int] | None = None) -> None:
        records, self._pending = self._pending, []
        if records:
            self._next_write = records[-1].wall_time_s + self.every_s
        first, self._first = self._first, None
        for gate in self._gates:
            if first is not None:
                gate.logger.log(first, 0)
            gate.write(records, self.tokens)
            if extra is not None:
                gate.logger.log(*extra)
            gate.logger.flush()


class _Gate:
    """One logger's share of the run's time: a step is written while the logger's time so far
    (writes and flushes), plus what a step costs it, stays within ``max_overhead`` of the run's
    time at that step; each batch's last step is written whatever it costs."""

    def __init__(self, logger: Logger) -> None:
        self.logger, self.budget = logger, logger.max_overhead
        self.spent = 0.0  # seconds in this logger's log and flush calls so far
        self.per_step: float | None = None  # seconds a written step costs it, flush included

    def write(self, records: list[StepRecord], tokens: bool) -> None:
        log = self.logger.log
        if self.budget is None:
            for rec in records:
                log(step_metrics(rec, tokens=tokens), rec.step)
            return
        if not records:
            return
        start, written, last = time.perf_counter(), 0, records[-1]
        for rec in records:
            if rec is not last and self.per_step is not None and (
                    self.spent + (time.perf_counter() - start) + self.per_step > self.budget * rec.wall_time_s):
                continue
            log(step_metrics(rec, tokens=tokens), rec.step)
            written += 1
            if self.per_step is None:  # calibrated on the first step written, its flush included
                self.logger.flush()
                self.per_step = time.perf_counter() - start
        self.logger.flush()
        took = time.perf_counter() - start
        self.spent += took
        self.per_step = 0.5 * (self.per_step + took / written)


def setup_loggers(log: LogConfig, *, resume: bool = False, tokens: bool = False,
                  probe: MemoryProbeResult | None = None, main: bool = True) -> list[Callback]:
    """The callback feeding ``log.loggers`` (names built with ``log.log_dir``, appending to
    their files when the run resumes), or none: without loggers, and on every process but
    rank 0 (whose figures are the run's)."""
    if not log.loggers or not main:
        return []
    built = [create("logger", spec, log_dir=log.log_dir, append=resume) for spec in log.loggers]
    return [LogMetrics(built, tokens=tokens, probe=probe)]

