"""What a checkpoint must agree with before a fit resumes from it.

A checkpoint continues one run, so :func:`~autobatch.train.checkpoint.restore_run` refuses one
that does not fit this run before it touches the model, the optimizer, the controller, the
sample stream or the RNGs:

- :func:`run_settings` describes what gives a run its meaning (below), independent of the
  number of processes; the checkpoint stores it and :func:`check_settings` compares it, one
  ``ValueError`` naming every difference;
- :func:`check_counters`: the step, sample and epoch counters agree with each other, with the
  history and with the data set size (a checkpoint edited or damaged otherwise);
- :func:`check_model_state` and :func:`check_optimizer_state`: the state in the file fits the
  model (names, shapes, dtypes) and the optimizer (groups, per-parameter state).

The settings compared are every setting of the config except those of :data:`MAY_CHANGE` and
:data:`BOUNDS` (the policy and the LR rule as resolved: a registered name, else the class), the
base LR of each param group, the LR scheduler's class, the data set size (examples per epoch),
the optimizer's class and the shape of every parameter of each of its groups, the model's
parameter names and shapes, the loss-items mode and the precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.config import FitConfig
from autobatch.registry import FAMILIES

__all__ = ["BOUNDS", "MAY_CHANGE", "check_counters", "check_model_state", "check_optimizer_state",
           "check_settings", "run_settings"]

# Settings that may change on resume: they decide how fast, where and how visibly the run goes,
# not what its steps compute. (The stopping rules, epochs, max_steps and max_samples, are
# arguments of fit and may change too: that is how a run is extended.) A lower memory setting
# is honoured: the smaller of the checkpoint's micro-batch cap and this run's applies.
MAY_CHANGE = ("progress", "eval_every", "log_every", "checkpoint_every", "loggers", "log_dir", "num_workers",
              "probe_memory", "memory_budget", "memory_margin", "max_micro_batch_size", "fsdp_reduce",
              "max_nonfinite_steps")
# Bounds on the batch size: they may change, and a checkpoint's batch size outside them is moved
# inside from the first resumed step, with a warning (BatchSizeController.load_state_dict).
BOUNDS = ("min_batch_size", "max_batch_size")

_SHOWN = 3  # differences of one table (model parameters, param groups) named in a message


class _Absent:
    """A setting or table entry one side does not have."""

    def __repr__(self) -> str:
        return "(absent)"

    __str__ = __repr__


_ABSENT = _Absent()


def run_settings(cfg: FitConfig, *, model: nn.Module, optimizer: torch.optim.Optimizer, base_lrs: list[float],
                 scheduler: Any, controller: Any, num_examples: int, loss_items: Any, precision: str) -> dict[str, Any]:
    """The settings that give a run its meaning, as plain data (module docstring).

    Args:
        cfg: the run's config.
        model: the model (sharded or not: a parameter's shape is its global shape).
        optimizer: the optimizer built over it.
        base_lrs: each param group's LR before the LR rule and the scheduler.
        scheduler: the user's LR scheduler, or None.
        controller: the batch-size controller (its policy and LR rule, resolved).
        num_examples: examples per epoch.
        loss_items: the loss-items mode, resolved (``"examples"``, ``"tokens"`` or a function).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """
    settings = {name: value for name, value in cfg.settings().items() if name not in MAY_CHANGE + BOUNDS}
    settings.update(
        policy=_plugin("policy", controller.policy),
        lr_scaling=_plugin("lr_scaling", controller.scaling),
        lr=[float(lr) for lr in base_lrs],
        lr_scheduler=None if scheduler is None else _qualname(type(scheduler)),
        num_examples=int(num_examples),
        optimizer=_qualname(type(optimizer)),
        param_groups={f"group {i} parameter {j}": list(p.shape)
                      for i, group in enumerate(optimizer.param_groups) for j, p in enumerate(group["params"])},
        model={name: list(p.shape) for name, p in model.named_parameters()},
        loss_items=loss_items if isinstance(loss_items, str) else f"function {_qualname(loss_items)}",
        precision=precision,
    )
    return settings


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _plugin(family: str, plugin: Any) -> str:
    """A policy's or LR rule's registered name, else its class (an instance of the user's)."""
    cls = type(plugin)
    ref = f"{cls.__module__}:{cls.__qualname__}"
    return next((name for name, entry in FAMILIES[family].entries.items() if entry == ref), _qualname(cls))


def check_settings(path: Path, saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Refuse a checkpoint written with other settings than ``current`` (:func:`run_settings`).

    Raises:
        ValueError: naming every setting that differs, with the checkpoint's value and this
            run's, and the fix.
    """
    saved = saved if isinstance(saved, Mapping) else {}
    differences = []
    for name in _differing(saved, current):
        old, new = saved.get(name, _ABSENT), current.get(name, _ABSENT)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences.append(f"{name}: {_table_differences(old, new)}")
        else:
            differences.append(f"{name}: checkpoint {old!r}, this run {new!r}")
    if differences:
        raise ValueError(
            f"refusing to resume from checkpoint {path}: it was written with other settings than this run's, and "
            f"continuing it with these would give a run that matches neither the original nor a fresh one "
            f"({'; '.join(differences)}). Resume with the checkpoint's settings, or start fresh in another "
            "checkpoint_dir. Only the stopping rules (epochs, max_steps, max_samples), the batch size bounds "
            f"({', '.join(BOUNDS)}: a batch size outside them is moved inside, with a warning) and "
            f"{', '.join(MAY_CHANGE)} may change on resume"
        )


def _differing(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ, or that one side lacks, the checkpoint's order first."""
    return [k for k in [*saved, *(k for k in current if k not in saved)]
            if saved.get(k, _ABSENT) != current.get(k, _ABSENT)]


def _table_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The first entries of two tables (name -> shape) that differ, as one phrase."""
    keys = _differing(saved, current)
    shown = "; ".join(f"{k}: checkpoint {saved.get(k, _ABSENT)}, this run {current.get(k, _ABSENT)}"
                      for k in keys[:_SHOWN])
    more = f"; and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{len(keys)} of {len(saved.keys() | current.keys())} differ ({shown}{more})"


def check_counters(path: Path, ckpt: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose counters disagree (edited, or damaged): steps, samples and
    epochs must agree with the history, the sample stream's position, the data set size and
    the controller's own counters.

    Raises:
        ValueError: naming every counter that disagrees, and the fix.
    """
    try:
        problems = _counter_problems(ckpt["result"], ckpt["stream"], ckpt["controller"])
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as err:
        problems = [f"its counters are missing or malformed ({type(err).__name__}: {err})"]
    if problems:
        raise ValueError(
            f"refusing to resume from checkpoint {path}: its counters disagree ({'; '.join(problems)}), so the "
            "file was edited or damaged and resuming would train from the wrong point or not at all. Resume from a "
            "copy you trust, or move it away to start fresh"
        )


def _counter_problems(result: Mapping[str, Any], stream: Mapping[str, Any], controller: Mapping[str, Any]) -> list[str]:
    history = result["history"]
    steps, samples, epochs = int(result["steps"]), int(result["samples"]), float(result["epochs"])
    skipped, tails = int(result["skipped_steps"]), int(result["small_tails"])
    n, epoch, position = int(stream["num_examples"]), int(stream["epoch"]), int(stream["position"])
    problems = [f"{name}={value} is negative" for name, value in
                (("steps", steps), ("samples", samples), ("skipped_steps", skipped), ("small_tails", tails)) if value < 0]
    # one record per step, numbered from 1; the samples are the records' examples
    examples, last = sum(int(r["examples"]) for r in history), int(history[-1]["samples"]) if history else 0
    marked = sum(bool(r["skipped"]) for r in history)
    if [int(r["step"]) for r in history] != list(range(1, steps + 1)):
        problems.append(f"steps={steps}, but the history holds {len(history)} steps, numbered from 1 one by one")
    elif samples != examples or last != samples:
        problems.append(f"samples={samples}, but the history's steps hold {examples} examples and its last step "
                        f"counts {last}")
    if skipped != marked:
        problems.append(f"skipped_steps={skipped}, but the history marks {marked} steps skipped")
    # every example the stream handed out was trained on, but the epoch tails dropped (small_tail)
    handed_out = epoch * n + position
    if handed_out < samples or (handed_out != samples and not tails):
        problems.append(f"the sample stream stands at epoch {epoch}, position {position} of {n} examples "
                        f"({handed_out} handed out), but samples={samples}")
    if not math.isclose(epochs, epoch + position / n, rel_tol=1e-12):
        problems.append(f"epochs={epochs}, but the stream's epoch {epoch} and position {position} of {n} make "
                        f"{epoch + position / n}")
    # the controller counts the steps it observed
    for name, own, expected in (("step", int(controller["step"]), steps), ("samples", int(controller["samples"]), samples)):
        if own != expected:
            problems.append(f"the controller's {name}={own}, the result's {expected}")
    if not math.isclose(float(controller["epoch"]), epochs, rel_tol=1e-12):
        problems.append(f"the controller's epoch={float(controller['epoch'])}, the result's {epochs}")
    return problems


def check_model_state(path: Path, state: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse model state that does not fit ``model``: every parameter and buffer named, of the
    same shape and dtype (checked before anything is copied: ``load_state_dict`` copies the
    tensors that fit before it reports the rest).

    Raises:
        ValueError: naming the file, the first entries that differ, and the fix.
    """
    saved, own = _tensor_table(state), _tensor_table(model.state_dict())
    if saved != own:
        raise ValueError(
            f"refusing to resume from checkpoint {path}: its model state does not fit this model (every parameter "
            f"and buffer must have the same name, shape and dtype; {_table_differences(saved, own)}); nothing was "
            "loaded. Resume with the model the checkpoint was written for, or start fresh in another checkpoint_dir"
        )


def _tensor_table(state: Mapping[str, Any]) -> dict[str, str]:
    return {name: f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor)
            else type(v).__name__ for name, v in state.items()}


def check_optimizer_state(path: Path, state: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizer state that does not fit ``optimizer`` (its class is a setting, compared
    before): the same groups of as many parameters, state only for those, each state tensor
    shaped as its parameter (or a scalar), and the same state keys where this optimizer holds
    state already.

    Raises:
        ValueError: naming the file, what differs, and the fix.
    """
    groups = optimizer.param_groups
    problems = []
    try:
        saved_groups = [list(g["params"]) for g in state["param_groups"]]
        sizes, own_sizes = [len(g) for g in saved_groups], [len(g["params"]) for g in groups]
        if sizes != own_sizes:
            problems.append(f"its param groups hold {sizes} parameters, this optimizer's {own_sizes}")
        params = dict(zip([i for g in saved_groups for i in g], [p for g in groups for p in g["params"]], strict=False))
        for index, param_state in state["state"].items():
            param = params.get(index)
            if param is None:
                problems.append(f"it holds state for parameter {index}, which no param group has")
                continue
            own = optimizer.state.get(param)
            if own and set(own) != set(param_state):
                problems.append(f"parameter {index}'s state holds {sorted(param_state)}, this optimizer's {sorted(own)}")
            problems += [f"parameter {index}'s {key} has shape {tuple(v.shape)}, the parameter {tuple(param.shape)}"
                         for key, v in param_state.items()
                         if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != param.shape]
    except (KeyError, TypeError, AttributeError) as err:
        problems.append(f"its optimizer state is malformed ({type(err).__name__}: {err})")
    if problems:
        raise ValueError(
            f"refusing to resume from checkpoint {path}: its optimizer state does not fit this optimizer "
            f"({'; '.join(problems[:_SHOWN])}{f'; and {len(problems) - _SHOWN} more' if len(problems) > _SHOWN else ''}); "
            "nothing was loaded. Resume with the optimizer the checkpoint was written for, or start fresh in another "
            "checkpoint_dir"
        )
