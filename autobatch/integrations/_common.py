"""What the trainer integrations share: the controller built from a FitConfig (``fit``'s own
:func:`~autobatch.train.controller.build_controller`, after refusing the settings a trainer
owns), the batch-size factor applied to the LR around ``optimizer.step()``, and rounding B to
whole micro-batches."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from autobatch.config import FitConfig
from autobatch.run_length import RunLength
from autobatch.train.controller import BatchSizeController, build_controller

__all__ = ["LRFactor", "explicit_settings", "round_to_multiple", "trainer_controller", "unwrap_optimizer"]

# FitConfig sections that describe fit's own loop; the integrations leave these to the trainer.
_TRAINER_OWNED = {
    "num_workers": "the DataLoader's / TrainingArguments' num_workers",
    "eval_every": "the trainer's evaluation schedule",
    "checkpoint_every": "the trainer's checkpointing",
    "progress": "the trainer's progress bar",
    "loggers": "the trainer's own loggers (Lightning's logger=, the Trainer's report_to), which get the same names",
    "log_dir": "the trainer's own loggers' folder",
}


def trainer_controller(
    cfg: FitConfig,
    *,
    optimizer: torch.optim.Optimizer | str,
    base_batch_size: int,
    max_batch_size: int,
    micro_batch_size: int | None,
    min_micro_batches: int,
    num_examples: int,
    epochs: float | None = None,
    max_steps: int | None = None,
    lr_scheduled: bool = False,
) -> BatchSizeController:
    """The controller ``fit`` would build for ``cfg`` (the same function builds it), with the
    trainer's own sizes and length, once the settings a trainer owns are checked.

    Args:
        cfg: the settings (policy, LR rule, estimator, bounds).
        optimizer: the optimizer (or its family's name, e.g. ``"sgd"``) whose family picks
            the default LR rule.
        base_batch_size: B0, global examples per optimizer step at the start.
        max_batch_size: the largest global B allowed (already clipped to the data set).
        micro_batch_size: the micro-batch cap (per process), or None for none.
        min_micro_batches: micro-batches per step and process when B allows.
        epochs, max_steps: the trainer's run length (None or <= 0: not set), so that the
            policy sees what binds and how far through it the run is
            (:attr:`~autobatch.policies.PolicyContext.progress`), as in ``fit``.
        num_examples: examples in the training set (for an epoch budget).
        lr_scheduled: whether the trainer's LR schedule decays the LR (the policy then leaves
            the decay to it).

    Raises:
        ValueError: for settings the integrations do not use (named with what replaces them)
            or a policy / LR rule that needs the noise scale while ``gns_method="off"``.
    """
    for key, owner in _TRAINER_OWNED.items():
        section = next(s for s in (cfg.data, cfg.log) if key in type(s).model_fields)
        if getattr(section, key) != type(section).model_fields[key].get_default(call_default_factory=True):
            raise ValueError(f"{key} is not used by the trainer integrations; set {owner} instead")
    if cfg.estimator.gns_method == "per_example":
        raise ValueError(
            "gns_method='per_example' is not supported by the trainer integrations; use "
            "gns_method='micro' (micro-batch norms, free) or 'off'"
        )
    run = RunLength(epochs if epochs is not None and epochs > 0 else None,
                    max_steps if max_steps is not None and max_steps > 0 else None)
    return build_controller(cfg, optimizer=optimizer, method=cfg.estimator.gns_method,
                          base_batch_size=base_batch_size, max_batch_size=max_batch_size,
                          micro_batch_size=micro_batch_size, min_micro_batches=min_micro_batches,
                          run=run, num_examples=num_examples, lr_scheduled=lr_scheduled)


def explicit_settings(config: FitConfig | dict[str, Any] | None, overrides: dict[str, Any]) -> set[str]:
    """Flat names of the settings the user gave (in ``config`` or ``overrides``), as opposed to
    defaults, so that a trainer-derived default (e.g. B0 from the DataLoader) can apply."""
    keys: set[str] = set()
    for source in (config, overrides):
        if isinstance(source, FitConfig):
            for name in type(source).model_fields:
                value = getattr(source, name)
                keys |= set(value.model_fields_set) if hasattr(value, "model_fields_set") else {name}
        elif isinstance(source, dict):
            for key, value in source.items():
                keys |= set(value) if isinstance(value, dict) else {key}
    return keys


def round_to_multiple(value: int, unit: int, lo: int, hi: int) -> int:
    """The multiple of ``unit`` nearest ``value`` within ``[lo, hi]`` (ties round up); ``lo``
    and ``hi`` are first moved inwards to multiples of ``unit``."""
    lo_m = max(unit, math.ceil(lo / unit) * unit)
    hi_m = max(lo_m, (hi // unit) * unit)
    return int(min(max(unit * math.floor(value / unit + 0.5), lo_m), hi_m))


class LRFactor:
    """Multiplies every param group's LR by :attr:`factor` while ``optimizer.step()`` runs,
    then puts the LR back.

    The trainer's LR scheduler therefore only ever sees (and steps from) its own values, chained
    or closed-form alike, and the LR the update uses is ``scheduled LR x factor``: the batch-size
    factor composes with any schedule instead of overwriting it. Uses torch's per-optimizer
    step hooks, which also fire when a GradScaler or a wrapper calls ``step()``; a step the
    scaler skips touches nothing.

    Args:
        optimizers: the torch optimizers to rescale (wrappers exposing ``.optimizer``, as
            accelerate's and Lightning's do, are unwrapped).

    Attributes:
        factor: the multiplier for the next ``step()`` calls (1.0 at first).
        last_lrs: the first param group's LR as used by the last step, per optimizer.
        last_base_lrs: that group's LR as the scheduler set it for the last step (before the
            factor): ``StepRecord.base_lr``.
    """

    def __init__(self, optimizers: Iterable[Any]) -> None:
        self.factor = 1.0
        self._optimizers = [unwrap_optimizer(o) for o in optimizers]
        self.last_lrs = [float(opt.param_groups[0]["lr"]) for opt in self._optimizers]
        self.last_base_lrs = list(self.last_lrs)
        self._saved: dict[int, list[Any]] = {}
        self._handles = []
        for i, opt in enumerate(self._optimizers):
            self._handles.append(opt.register_step_pre_hook(self._pre(i)))
            self._handles.append(opt.register_step_post_hook(self._post(i)))

    def _pre(self, i: int):
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._saved[i] = [group["lr"] for group in opt.param_groups]
            for group, lr in zip(opt.param_groups, self._saved[i]):
                group["lr"] = lr * self.factor
            self.last_lrs[i] = float(opt.param_groups[0]["lr"])
            self.last_base_lrs[i] = float(self._saved[i][0])

        return hook

    def _post(self, i: int):
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group, lr in zip(opt.param_groups, self._saved.pop(i, [])):
                group["lr"] = lr

        return hook

    def remove(self) -> None:
        """Remove the hooks (the LRs are left as the scheduler set them)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose ``step()`` really runs, under wrappers exposing ``.optimizer``."""
    # accelerate's AcceleratedOptimizer (itself an Optimizer) and similar wrappers step the
    # optimizer they hold; the hooks must sit on that one, whose step() really runs.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (got {type(optimizer).__name__})")
    return optimizer
