"""Skipping an optimizer step whose loss or gradient is not finite, leaving no trace of it.

By the time ``fit`` knows a step is not finite (the step's one host sync, after the
backward), its forward has already run: BatchNorm running statistics (and any other buffer
a forward writes) hold the bad batch's values, NaN included. :class:`NonFiniteSteps` copies
the model's buffers before each step (one ``_foreach_copy_`` into storage allocated once:
BatchNorm statistics are a few kB to MB, next to a step's activations) and copies them back
when the step is skipped, so a skipped step leaves the model exactly as before it.

With fp16, the GradScaler must also see the overflow: ``scaler.update()`` refuses to run
unless ``unscale_`` (or ``step``) recorded an inf check this iteration, and it is the
update after an overflow that lowers the scale. So the skip path calls ``unscale_`` (which
records the infs) and then ``update``, exactly as ``scaler.step`` would have on an overflow.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from autobatch.noise.micro_batch import StepGradNorms

__all__ = ["NonFiniteSteps"]


class NonFiniteSteps:
    """Snapshot buffers before a step; on a non-finite step undo it, warn once, count it.

    Args:
        model: the (unwrapped) model whose buffers a skipped step must not change.
        opt: the optimizer (its gradients are cleared on a skip).
        scaler: the fp16 ``GradScaler``, or None.
        max_in_row: raise after this many non-finite steps in a row.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, max_in_row: int) -> None:
        self.opt, self.scaler, self.max_in_row = opt, scaler, max_in_row
        self.in_row = 0
        self._warned = False
        self._buffers = [b for b in model.buffers() if b.numel()]
        self._copies = [torch.empty_like(b) for b in self._buffers]

    def before_step(self) -> None:
        """Remember the buffers (call before the step's first forward)."""
        if self._buffers:
            torch._foreach_copy_(self._copies, self._buffers)

    def restore_buffers(self) -> None:
        """Put the buffers back as :meth:`before_step` found them (after an attempt that ran
        out of memory, whose forwards already updated BatchNorm statistics)."""
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._copies)

    def finite(self) -> None:
        """The step was finite and taken."""
        self.in_row = 0

    def skip(self, step: int, epoch: float, train_loss: float, norms: StepGradNorms | None) -> None:
        """Undo a non-finite step: buffers back, gradients cleared, the fp16 scale lowered.

        Args:
            step: the step's number (from 1).
            epoch: fractional epochs done.
            train_loss: the step's mean loss.
            norms: the step's gradient norms (None with ``gns_method="off"``).

        Raises:
            FloatingPointError: after ``max_in_row`` non-finite steps in a row.
        """
        self.restore_buffers()
        if self.scaler is not None and any(
            p.grad is not None for g in self.opt.param_groups for p in g["params"]
        ):
            self.scaler.unscale_(self.opt)  # records the infs, so that update lowers the scale
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.in_row += 1
        what = _kind(train_loss, norms)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"skipped optimizer step {step} (epoch {epoch:.2f}): the {what}; the model, "
                "its buffers (BatchNorm statistics) and the optimizer are as before the step. "
                "Further skipped steps are counted in FitResult.skipped_steps and "
                "StepRecord.skipped without a warning",
                RuntimeWarning, stacklevel=4,  # skip < train < autobatch.fit < the caller
            )
        if self.in_row >= self.max_in_row:
            raise FloatingPointError(
                f"{self.in_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(last: step {step}, the {what}; max_nonfinite_steps={self.max_in_row}); "
                "lower lr, check the data, or raise max_nonfinite_steps"
            )


def _kind(train_loss: float, norms: StepGradNorms | None) -> str:
    """'loss is nan', 'gradient is inf', ...: what was not finite."""
    if not math.isfinite(train_loss):
        return f"loss is {'nan' if math.isnan(train_loss) else 'inf'}"
    value = norms.big_sq_norm if norms is not None else math.nan
    return f"gradient is {'nan' if math.isnan(value) else 'inf'} (squared norm {value})"
