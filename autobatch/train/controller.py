"""The batch-size controller: estimator + policy + LR rule + memory cap, no model and no data.

:class:`BatchSizeController` is the state a custom training loop needs to follow autobatch's
decisions. Per optimizer step the loop asks it how to split the step into micro-batches
(:meth:`micro_sizes`), reads the LR multiplier (:meth:`lr_factor`, the one place where the LR
is assembled), feeds it the step's gradient norms and time (:meth:`observe`) and lets it
re-decide the global batch size (:meth:`maybe_decide`). An out-of-memory micro-batch lowers the
micro-batch cap (:meth:`on_oom`); the global batch size is kept through more accumulation.

``step`` means one thing everywhere here: the number of an optimizer step, counted from 1 (the
LR of step 1, the norms of step 1; once step ``k`` is done, ``k`` steps are done).
:func:`build_controller` builds the controller a :class:`~autobatch.config.FitConfig` describes:
``fit``'s, and the trainer integrations'.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from autobatch.config import FitConfig
from autobatch.noise.estimator import GradientNoiseScale
from autobatch.policies.base import BatchSizePolicy, PolicyContext
from autobatch.registry import make_policy, make_scaling
from autobatch.run_length import LimitKind, RunLength
from autobatch.scaling.base import LRScaling
from autobatch.scaling.rules import default_scaling
from autobatch.train.sampler import split_sizes

__all__ = ["BatchSizeController", "build_controller"]

_TIME_WINDOW = 20  # step times kept per global batch size for the median


class BatchSizeController:
    """Decides the global batch size B, its micro-batch split and the LR multiplier.

    Args:
        policy: proposes the next global batch size.
        scaling: maps the base LR (tuned at ``base_batch_size``) to the LR at B.
        estimator: the gradient noise scale estimate the policy and the scaling read.
        base_batch_size: B0, the first global batch size and the one the base LR is tuned at.
        min_batch_size, max_batch_size: bounds on B (examples, global across ranks).
        decide_every: optimizer steps between two decisions.
        max_micro_batch_size: the most examples one forward/backward may hold (the memory
            probe's answer); None means no cap.
        min_micro_batches: micro-batches per step when B allows (2 gives the estimator its two
            batch sizes at no extra cost).
        max_lr_factor: upper bound on the scaling rule's factor (None: unbounded).
        warmup_steps: optimizer steps of linear LR warm-up from 0 (0: none); applied by
            :meth:`lr_factor` when it is given the step.
        limited_by: what limits the run, ``"samples"`` or ``"steps"``
            (:attr:`autobatch.run_length.RunLength.limited_by`); the policy sees it.
        run_length: the size of that limit, in examples (``"samples"``) or optimizer steps
            (``"steps"``), or None when unknown; the policy sees the fraction done
            (:attr:`PolicyContext.progress`).
        lr_scheduled: whether a user's LR scheduler shapes the base LR (the policy sees it).

    Attributes:
        batch_size: the current global batch size B.
        max_micro_batch_size: the current micro-batch cap (lowered by :meth:`on_oom`).
    """

    def __init__(
        self,
        *,
        policy: BatchSizePolicy,
        scaling: LRScaling,
        estimator: GradientNoiseScale,
        base_batch_size: int,
        min_batch_size: int,
        max_batch_size: int,
        decide_every: int = 10,
        max_micro_batch_size: int | None = None,
        min_micro_batches: int = 2,
        max_lr_factor: float | None = None,
        warmup_steps: int = 0,
        limited_by: LimitKind = "samples",
        run_length: float | None = None,
        lr_scheduled: bool = False,
    ) -> None:
        if not 1 <= min_batch_size <= base_batch_size <= max_batch_size:
            raise ValueError(
                "batch sizes must satisfy 1 <= min_batch_size <= base_batch_size <= "
                f"max_batch_size (got min_batch_size={min_batch_size}, base_batch_size="
                f"{base_batch_size}, max_batch_size={max_batch_size})"
            )
        if decide_every < 1:
            raise ValueError(f"decide_every must be >= 1 (got decide_every={decide_every})")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got warmup_steps={warmup_steps})")
        self.policy = policy
        self.scaling = scaling
        self.estimator = estimator
        self.base_batch_size = base_batch_size
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.decide_every = decide_every
        self.max_micro_batch_size = max_micro_batch_size
        self.min_micro_batches = min_micro_batches
        self.max_lr_factor = max_lr_factor
        self.warmup_steps = warmup_steps
        self.limited_by = limited_by
        self.run_length = run_length
        self.lr_scheduled = lr_scheduled
        self._loss = math.nan
        self.batch_size = base_batch_size
        self.num_decisions = 0
        self._step_times: dict[int, deque[float]] = {}
        self._medians: dict[int, float] = {}  # median of each _step_times window...
        self._stale: set[int] = set()  # ...except these, changed since (refreshed when read)
        self._step = 0
        self._epoch = 0.0
        self._samples = 0
        self._lr_peak = 0.0  # the user's schedule: its largest base LR so far, and the last over it
        self._lr_decay = 1.0
        # PolicyContext is built per step only for a policy that reads steps (the base's is a no-op)
        self._policy_observes = type(policy).observe is not BatchSizePolicy.observe

    # -- per step ----------------------------------------------------------------------------
    def micro_sizes(self, num_examples: int, min_parts: int | None = None) -> list[int]:
        """Split a step of ``num_examples`` into micro-batch sizes: at least ``min_parts``
        pieces (default ``min_micro_batches``; fewer only when there are fewer examples) and
        none above the micro-batch cap. Sizes differ by at most one, the larger first."""
        cap = self.max_micro_batch_size or num_examples
        least = self.min_micro_batches if min_parts is None else min_parts
        parts = max(min(least, num_examples), math.ceil(num_examples / cap))
        return split_sizes(num_examples, parts)

    def observe(
        self,
        *,
        step: int,
        epoch: float,
        samples: int,
        batch_size: int,
        step_time_s: float | None = None,
        norms: Any = None,
        loss: float | None = None,
        base_lr: float | None = None,
    ) -> None:
        """Record one finished optimizer step.

        The estimator gets the norms, then the policy sees the step
        (:meth:`BatchSizePolicy.observe`: e.g. the budget policy's loss-spike guard reads the
        loss here; nothing reads it when the LR is computed).

        Args:
            step: the step's number (from 1): the steps done, this one included.
            epoch: fractional epochs done.
            samples: examples processed so far (global).
            batch_size: examples in this step (global; the last step of an epoch may be short).
            step_time_s: wall seconds of the step (for the goodput policy), or None.
            norms: the step's gradient norms (an object with ``small_sq_norms``,
                ``small_batch_size``, ``big_sq_norm``, ``big_batch_size``), or None when the
                step gave no estimate. With no small norms (a step of one micro-batch), only
                the big norm is used (``GradientNoiseScale.update_big``). The estimator is
                told the step, so its averages keep their memory in steps however sparse the
                measurements (``GradientNoiseScale.update(step=)``).
            loss: the step's mean training loss (for the policy's stability guard), or None.
            base_lr: the step's base LR (the first param group's, the user's schedule
                before autobatch's factor), for :attr:`PolicyContext.lr_decay`; None leaves it.
        """
        self._step, self._epoch, self._samples = step, epoch, samples
        if base_lr is not None and base_lr > 0:
            self._lr_peak = max(self._lr_peak, base_lr)
            self._lr_decay = base_lr / self._lr_peak
        self._loss = math.nan if loss is None else float(loss)
        if norms is not None and norms.small_sq_norms:
            self.estimator.update(norms.small_sq_norms, norms.small_batch_size, norms.big_sq_norm,
                                  norms.big_batch_size, step=step)
        elif norms is not None:
            self.estimator.update_big(norms.big_sq_norm, norms.big_batch_size, step=step)
        if step_time_s is not None and batch_size == self.batch_size:
            times = self._step_times.get(batch_size)
            if times is None:  # (setdefault would build a deque every step)
                times = self._step_times[batch_size] = deque(maxlen=_TIME_WINDOW)
            times.append(step_time_s)
            self._stale.add(batch_size)
        if self._policy_observes:
            self.policy.observe(self.context(refresh_times=False))

    def context(self, *, refresh_times: bool = True) -> PolicyContext:
        """What the policy sees: counters, bounds, the noise estimate and measured step times.

        Args:
            refresh_times: recompute the median step times changed since the last refresh
                (a sort per batch size); the LR, assembled every step, leaves them as they
                were at the last decision, which is where they are read.
        """
        if refresh_times:
            for b in self._stale:
                self._medians[b] = statistics.median(self._step_times[b])
            self._stale.clear()
        est = self.estimator
        return PolicyContext(
            step=self._step,
            epoch=self._epoch,
            samples=self._samples,
            batch_size=self.batch_size,
            base_batch_size=self.base_batch_size,
            min_batch_size=self.min_batch_size,
            max_batch_size=self.max_batch_size,
            noise_scale=est.noise_scale,
            noise_ready=est.ready,
            noise_scale_stderr=est.noise_scale_stderr,
            grad_sq_mean=est.grad_sq_mean,
            trace_cov=est.trace_cov,
            grad_sq_stderr=est.grad_sq_stderr,
            trace_cov_stderr=est.trace_cov_stderr,
            grad_sq_dof=est.grad_sq_dof,
            trace_cov_dof=est.trace_cov_dof,
            max_micro_batch_size=self.max_micro_batch_size,
            step_time_s={b: self._medians[b] for b in self._step_times if b in self._medians},
            limited_by=self.limited_by,
            train_loss=self._loss,
            max_lr_factor=self.max_lr_factor,
            lr_rule=self._rule_factor,
            progress=self._progress(),
            lr_scheduled=self.lr_scheduled,
            lr_decay=self._lr_decay,
        )

    def _progress(self) -> float:
        """The fraction of the run done (NaN when its length is unknown)."""
        if not self.run_length:
            return math.nan
        done = self._step if self.limited_by == "steps" else self._samples
        return min(1.0, done / self.run_length)

    def _rule_factor(self, batch_size: int) -> float:
        """The scaling rule's factor at ``batch_size`` (global), at the current estimate."""
        est = self.estimator
        ready = est.ready
        return self.scaling.factor(
            batch_size,
            self.base_batch_size,
            grad_sq=est.grad_sq if ready else math.nan,
            trace_cov=est.trace_cov if ready else math.nan,
        )

    def lr_factor(self, step: int | None = None) -> float:
        """LR / base LR for step ``step``, the one place where the LR is assembled:

        ``min(rule(B), max_lr_factor) x policy factor x warm-up(step)``: the scaling rule at
        the current B (capped), the policy's own factor (a step decay at the milestones; the
        ramp policy decays the LR once B is capped; the budget policy brings the product down
        to the LR factor its guard allows), and the linear warm-up. A read: nothing changes.

        Args:
            step: the number (from 1) of the step this LR is for; None leaves the warm-up out.
        """
        warmup = 1.0
        if step is not None and self.warmup_steps:
            warmup = min(1.0, step / self.warmup_steps)
        return self._batch_lr_factor() * warmup

    def _batch_lr_factor(self) -> float:
        factor = self._rule_factor(self.batch_size)
        if self.max_lr_factor is not None:
            factor = min(factor, self.max_lr_factor)
        return factor * self.policy.lr_factor(self.context(refresh_times=False))

    def maybe_decide(self, agree: Callable[[int], int] | None = None) -> int | None:
        """Every ``decide_every`` observed steps, ask the policy for the next B.

        Args:
            agree: under data parallelism, turns this process's decision into the one every
                process takes (e.g. rank 0's, broadcast: ranks' step times may differ, and
                so their policies' proposals). Called on every decision, changed or not, so
                every process reaches its collective at the same steps; it may also round.

        Returns:
            The new global batch size if it changed, else None.
        """
        if self._step == 0 or self._step % self.decide_every:
            return None
        proposal = int(self.policy.propose(self.context()))
        proposal = min(max(proposal, self.min_batch_size), self.max_batch_size)
        if agree is not None:
            proposal = int(agree(proposal))
        self.num_decisions += 1
        if proposal == self.batch_size:
            return None
        self.batch_size = proposal
        return proposal

    def on_oom(self, micro_batch_size: int) -> int:
        """A micro-batch of ``micro_batch_size`` examples ran out of memory: halve the cap.

        Returns:
            The new micro-batch cap.

        Raises:
            RuntimeError: if a single example does not fit (nothing smaller exists).
        """
        if micro_batch_size <= 1:
            raise RuntimeError(
                "a single example ran out of memory (micro_batch_size=1); the model does not "
                "fit this device or budget: raise memory_budget, use a smaller model, or "
                "lower precision"
            )
        self.max_micro_batch_size = max(1, micro_batch_size // 2)
        return self.max_micro_batch_size

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Batch size, caps, counters, estimator and policy state (step times included)."""
        return {
            "batch_size": self.batch_size,
            "max_micro_batch_size": self.max_micro_batch_size,
            "num_decisions": self.num_decisions,
            "step": self._step,
            "epoch": self._epoch,
            "samples": self._samples,
            "lr_peak": self._lr_peak,
            "lr_decay": self._lr_decay,
            "step_times": {b: list(t) for b, t in self._step_times.items()},
            "estimator": self.estimator.state_dict(),
            "policy": self.policy.state_dict(),
            "scaling": self.scaling.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` written by a controller with the same settings, but
        for the caps, which may change: a batch size outside this controller's bounds is moved
        inside them (with a warning), and the smaller of the two micro-batch caps applies."""
        saved = int(state["batch_size"])
        self.batch_size = min(max(saved, self.min_batch_size), self.max_batch_size)
        if self.batch_size != saved:
            warnings.warn(
                f"the checkpoint's batch size {saved} is outside this run's bounds (min_batch_size="
                f"{self.min_batch_size}, max_batch_size={self.max_batch_size}); resuming at {self.batch_size} from "
                "the first resumed step. The bounds may change on resume; pass the checkpoint's to continue the "
                "run as it was", stacklevel=2)
        caps = [c for c in (state["max_micro_batch_size"], self.max_micro_batch_size) if c is not None]
        self.max_micro_batch_size = min(caps) if caps else None
        self.num_decisions = int(state["num_decisions"])
        self._step, self._epoch = int(state["step"]), float(state["epoch"])
        self._samples = int(state["samples"])
        self._lr_peak = float(state.get("lr_peak", 0.0))  # (absent before the schedule policy)
        self._lr_decay = float(state.get("lr_decay", 1.0))
        self._step_times = {
            int(b): deque(t, maxlen=_TIME_WINDOW) for b, t in state["step_times"].items()
        }
        self._medians, self._stale = {}, {b for b, t in self._step_times.items() if t}
        self.estimator.load_state_dict(state["estimator"])
        self.policy.load_state_dict(state["policy"])
        self.scaling.load_state_dict(state["scaling"])


def build_controller(cfg: FitConfig, *, optimizer: Any, method: str, base_batch_size: int, max_batch_size: int,
                     micro_batch_size: int | None, min_micro_batches: int, run: RunLength | None = None,
                     num_examples: int = 0, lr_scheduled: bool = False) -> BatchSizeController:
    """The batch-size controller ``cfg`` describes (``fit``'s, and the trainer integrations'),
    with the caller's sizes.

    Args:
        cfg: the settings (policy, LR rule, estimator, bounds).
        optimizer: the optimizer (or its family's name, e.g. ``"sgd"``) whose family picks the
            default LR rule.
        method: the noise-scale method in use (``"micro"``, ``"per_example"`` or ``"off"``).
        base_batch_size: B0, global examples per optimizer step at the start.
        max_batch_size: the largest global B allowed (already clipped to the data set).
        micro_batch_size: the micro-batch cap (per process), or None for none.
        min_micro_batches: micro-batches per step and process when B allows.
        run: the run's stopping rules, from which the policy learns what limits it and how
            far through it the run is (:class:`~autobatch.run_length.RunLength`; None: none).
        num_examples: examples in the training set (one epoch).
        lr_scheduled: whether a user's LR scheduler shapes the base LR.

    Raises:
        ValueError: for a policy or LR rule that needs the noise scale while ``method="off"``.
    """
    run = run if run is not None else RunLength()
    scaling_name = cfg.lr.lr_scaling or default_scaling(optimizer)
    if method == "off" and (cfg.batch.policy in ("budget", "gns", "goodput", "measure") or scaling_name == "adascale"):
        raise ValueError(
            f"gns_method='off' leaves policy={cfg.batch.policy!r} / lr_scaling={scaling_name!r} "
            "without the noise scale they need; use policy 'fixed' or 'ramp' with lr_scaling "
            "'linear', 'sqrt' or 'none', or measure with gns_method='micro'"
        )
    return BatchSizeController(
        policy=make_policy(cfg.batch.policy, cfg.batch, cfg.lr),
        scaling=make_scaling(scaling_name),
        estimator=GradientNoiseScale(cfg.estimator.gns_smoothing, min_updates=cfg.estimator.gns_min_updates),
        base_batch_size=base_batch_size,
        min_batch_size=min(cfg.batch.min_batch_size or base_batch_size, base_batch_size),
        max_batch_size=max_batch_size,
        decide_every=cfg.batch.decide_every,
        max_micro_batch_size=micro_batch_size,
        min_micro_batches=min_micro_batches,
        max_lr_factor=cfg.lr.max_lr_factor,
        warmup_steps=cfg.lr.warmup_steps,
        limited_by=run.limited_by,
        run_length=run.length(num_examples),
        lr_scheduled=lr_scheduled,
    )
