"""The logger family: where a run's figures go while it runs, under names that never change.

A :class:`Logger` receives flat ``{name: number}`` dicts by optimizer step (:meth:`Logger.log`).
The names are the same in ``fit``, the Lightning callback and the Hugging Face trainer
(:data:`STEP_KEYS`; the Hugging Face Trainer's own writers put ``train/`` in front of every
training-time name, see ``docs/integrations.md``):

========================== ===================================================================
``train/batch_size``       B, the global batch of the step (examples, all ranks)
``train/micro_batch_size`` the largest micro-batch the step ran (examples, per rank)
``train/lr``               the LR the step used (first param group: base LR x batch factor)
``train/loss``             the step's mean training loss
``train/examples``         examples processed so far (cumulative, all ranks)
``train/tokens``           loss items processed so far (cumulative): tokens for language-model
                           data; absent when the loss items are the examples
``train/epoch``            epochs done, fractional
``gns/noise_scale``        B_simple = tr(Sigma)/|G|^2, examples (NaN until the estimate is ready)
``gns/noise_scale_stderr`` its standard error
``gns/grad_sq``            the smoothed |G|^2 (squared norm of the mean-loss gradient)
``gns/trace_sigma``        the smoothed tr(Sigma) (per-example gradient variance, summed)
``val/<name>``             each evaluation's metrics (``val_loss`` becomes ``val/loss``)
``probe/<field>``          the memory probe's answer, once, at step 0, when the run probed
========================== ===================================================================

The maths of the conversion lives here once (:func:`step_metrics`, :func:`eval_metrics`,
:func:`probe_metrics`); ``fit`` feeds loggers through :class:`autobatch.train.callbacks.LogMetrics`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autobatch.memory.probe import MemoryProbeResult
    from autobatch.train.results import StepRecord

__all__ = ["STEP_KEYS", "Logger", "eval_metrics", "probe_metrics", "step_metrics"]

STEP_KEYS = (
    "train/batch_size", "train/micro_batch_size", "train/lr", "train/loss", "train/examples", "train/tokens",
    "train/epoch", "gns/noise_scale", "gns/noise_scale_stderr", "gns/grad_sq", "gns/trace_sigma",
)

_PROBE_FIELDS = ("max_micro_batch_size", "min_micro_batch_size", "peak_bytes_at_max", "budget_bytes",
                 "limit_bytes", "fixed_bytes", "bytes_per_sample")


class Logger(ABC):
    """Receives a run's figures by optimizer step; a subclass writes :meth:`log`.

    ``fit`` calls a logger in batches (every couple of seconds of the run, at every evaluation
    and at the end), never from inside a step, then :meth:`flush`; :meth:`close` once at the end.

    Attributes:
        max_overhead: the largest fraction of the run's time this logger's writes may take
            (0.01: 1%). ``fit`` times each :meth:`log` call; when writes are slower than that on
            short steps it writes only every so many steps (evaluations, the first and the last
            step always). None: every step, whatever it costs (the file loggers: a few
            microseconds a step).
    """

    max_overhead: float | None = 0.01

    @abstractmethod
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record ``metrics`` (name -> int or float, NaN where unknown) at optimizer ``step``."""

    def flush(self) -> None:
        """Make what was logged so far readable (buffers written, files flushed). A no-op here."""

    def close(self) -> None:
        """The run is over: flush, release files and runs. Calls :meth:`flush` here."""
        self.flush()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def step_metrics(record: StepRecord, *, tokens: bool = False) -> dict[str, float]:
    """The stable names of one :class:`~autobatch.train.results.StepRecord`.

    Args:
        record: the step.
        tokens: include ``train/tokens`` (``record.loss_items``): True when the run's loss items
            are not its examples (tokens of language-model data).
    """
    out = {
        "train/batch_size": record.batch_size,
        "train/micro_batch_size": record.micro_batch_size,
        "train/lr": record.lr,
        "train/loss": record.train_loss,
        "train/examples": record.samples,
        "train/epoch": record.epoch,
        "gns/noise_scale": record.noise_scale,
        "gns/noise_scale_stderr": record.noise_scale_stderr,
        "gns/grad_sq": record.grad_sq,
        "gns/trace_sigma": record.trace_cov,
    }
    if tokens:
        out["train/tokens"] = record.loss_items
    return out


def eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's numbers under ``val/``: ``val_loss`` -> ``val/loss``, ``accuracy`` ->
    ``val/accuracy`` (what is not a number is left out)."""
    return {f"val/{name.removeprefix('val_')}": value for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def probe_metrics(probe: MemoryProbeResult) -> dict[str, float]:
    """The memory probe's answer under ``probe/`` (sizes in examples, memory in bytes)."""
    return {f"probe/{name}": getattr(probe, name) for name in _PROBE_FIELDS}


def finite_or_none(value: Any) -> Any:
    """``value``, or None for a NaN or infinite float (JSON has neither)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
