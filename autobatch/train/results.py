"""What ``autobatch.fit`` returns: the model, its metrics and a per-step history."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from autobatch._optional import import_pandas

__all__ = ["FitResult", "StepRecord"]


class StepRecord(BaseModel):
    """One optimizer step (or one skipped step) of a fit.

    Sizes are global (all ranks) and in examples: ``batch_size`` is the chosen B,
    ``examples`` what the step held (fewer for the last step of an epoch); ``lr`` is the first parameter group's LR
    used for this step, ``base_lr`` that group's LR before autobatch's factor (the user's
    ``lr_scheduler`` at this point of its clock, else the base LR), so ``lr / base_lr`` is
    the batch-size factor (scaling rule x cap x policy x warm-up); ``grad_sq``, ``trace_cov`` and
    ``noise_scale`` are the estimator's
    smoothed values after this step (NaN until it has data; ``noise_scale`` stays NaN until
    the estimator is ready) and ``noise_scale_stderr`` the noise scale's standard error; ``wall_time_s`` is seconds since
    the fit started (evaluation included); ``loss_items`` counts the loss items processed so far,
    like ``samples`` (all ranks, cumulative): tokens for a token-mean loss, else the examples
    (0 where an entry point does not count them).
    """

    model_config = ConfigDict(extra="forbid")

    step: int
    epoch: float
    samples: int
    batch_size: int
    examples: int
    micro_batch_size: int
    accum_steps: int
    lr: float
    base_lr: float = math.nan
    train_loss: float
    grad_sq: float
    trace_cov: float
    noise_scale: float
    noise_scale_stderr: float = math.inf
    wall_time_s: float
    skipped: bool = False
    loss_items: int = 0

    @classmethod
    def trusted(cls, **values: Any) -> StepRecord:
        """A record from values already of the field types, every field given, without
        validation: ``fit``'s per-step constructor (validating 16 fields costs a small
        model's step about 10 us, 1%, with the caches cold from the backward pass). Equal to
        ``StepRecord(**values)`` (tested); anything else should use that."""
        record = _new(cls)
        _set(record, "__dict__", values)
        _set(record, "__pydantic_fields_set__", _STEP_FIELDS)
        _set(record, "__pydantic_extra__", None)
        _set(record, "__pydantic_private__", None)
        return record


_STEP_FIELDS = frozenset(StepRecord.model_fields)
_new, _set = object.__new__, object.__setattr__


class FitResult(BaseModel):
    """The outcome of :func:`autobatch.fit`.

    Attributes:
        model: the trained model (the same object that was passed in).
        final_metrics: the last evaluation's metrics (``val_loss``, ``val_accuracy`` for
            classification, or whatever ``eval_fn`` returned), plus ``train_loss``.
        evals: every evaluation: ``{"step", "epoch", "samples", <metrics>}``.
        history: one :class:`StepRecord` per optimizer step.
        steps, samples, epochs: totals at the end (samples = examples processed).
        skipped_steps: steps skipped for a non-finite loss or gradient.
        oom_retries: micro-batch out-of-memory events recovered from.
        small_tails: steps smaller than the model trains on (``config.data.small_tail``),
            carried into the next step or dropped.
        max_micro_batch_size: the micro-batch cap in force at the end (None: uncapped).
        wall_time_s: seconds the fit took.
        stopped_by: why training ended ("max_steps", "max_samples", "max_tokens", "epochs",
            "callback").
        lr_search: with ``lr="auto"``, the :class:`~autobatch.tune.auto_lr.LRSearch` that chose
            the base LR (its trials, the LR, the examples it trained on; a dict after a
            resume from a checkpoint); None otherwise. Its examples are not in ``samples``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    model: torch.nn.Module
    final_metrics: dict[str, float] = Field(default_factory=dict)
    evals: list[dict[str, float]] = Field(default_factory=list)
    history: list[StepRecord] = Field(default_factory=list)
    steps: int = 0
    samples: int = 0
    epochs: float = 0.0
    skipped_steps: int = 0
    oom_retries: int = 0
    small_tails: int = 0
    max_micro_batch_size: int | None = None
    wall_time_s: float = 0.0
    stopped_by: str = ""
    lr_search: Any = None

    def batch_size_trajectory(self) -> list[tuple[int, int]]:
        """``[(step, B), ...]`` at the first step and at every step where B changed."""
        out: list[tuple[int, int]] = []
        for rec in self.history:
            if not out or out[-1][1] != rec.batch_size:
                out.append((rec.step, rec.batch_size))
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write the per-step history as CSV (one row per step, StepRecord's columns)."""
        path = Path(path)
        fields = list(StepRecord.model_fields)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for rec in self.history:
                writer.writerow(rec.model_dump())
        return path

    def to_pandas(self) -> Any:
        """The per-step history as a ``pandas.DataFrame``: one row per step, StepRecord's
        columns (the evaluations: ``pandas.DataFrame(result.evals)``).

        Raises:
            ImportError: without pandas (``pip install "torch-autobatch[pandas]"``).
        """
        pd = import_pandas("FitResult.to_pandas")
        return pd.DataFrame([rec.model_dump() for rec in self.history], columns=list(StepRecord.model_fields))

    def to_json(self, path: str | Path) -> Path:
        """Write everything but the model as JSON (NaN written as null)."""
        path = Path(path)
        data = self.model_dump(exclude={"model"})
        path.write_text(json.dumps(_nan_to_none(data), indent=1))
        return path

    def summary(self) -> str:
        """A few readable lines: metrics, steps, samples, time and the B trajectory."""
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in self.final_metrics.items())
        traj = " -> ".join(str(b) for _, b in self.batch_size_trajectory())
        return (
            f"steps={self.steps} samples={self.samples} epochs={self.epochs:.2f} "
            f"wall_time={self.wall_time_s:.1f}s skipped={self.skipped_steps} "
            f"oom_retries={self.oom_retries}\n"
            f"final: {metrics}\n"
            f"batch size: {traj}"
        )

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the run over one x axis, the optimizer step (examples seen on top):
        the loss (each step, its running mean, the evaluations), B above the micro-batch, the
        noise scale with its standard error against B (the steps without an estimate shaded,
        the legend says why), and the LR (with the base LR when the batch factor moved it). Log
        axes wherever the values span decades."""
        from autobatch._plots import plot_fit

        return plot_fit(self, path)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj
