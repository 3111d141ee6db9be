"""``fit``'s arguments checked before any work is done, every bad one named with its fix.

:func:`validate_fit_args` runs first thing in :func:`autobatch.train.loop.train`, so a bad
setting fails in seconds, not when the first checkpoint is written hours later. It reports
every problem it finds at once. The config's own fields are checked by
:class:`~autobatch.config.FitConfig` (pydantic).

Decisions:

- ``lr`` and the stopping rules must be numbers: a string such as ``lr="0.1"`` is refused,
  not converted (the CLI parses its own flags; a string in Python code is a bug upstream).
- An optimizer instance may hold a subset of the model's trainable parameters (the rest
  stay frozen, e.g. fine-tuning a head), but no parameter of another module: an optimizer
  built for another model would train nothing here.
- ``epochs=0``, ``max_steps=0`` or ``max_samples=0`` are allowed (no step runs; the model is
  evaluated); negative values are refused.
- A setting of the default evaluation that would go unused is refused: ``val_loss_fn``
  without ``val_data``, or with an ``eval_fn`` (which replaces the default evaluation) or a
  ``forward_loss`` (which replaces the loss), and an explicit ``accuracy`` alignment with
  ``forward_loss`` (no outputs to score) or ``eval_fn``. Whether ``val_data`` itself can be evaluated is
  checked later, once the model is on its device, with one forward
  (:func:`autobatch.evaluate.check_val_data`).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from autobatch.evaluate import accuracy_errors

__all__ = ["evaluation_errors", "validate_fit_args"]


def validate_fit_args(
    model: nn.Module, data: Any, val_data: Any, optimizer: Any, lr: Any, epochs: Any,
    max_steps: Any, max_samples: Any, device: Any, checkpoint_dir: Any, *, max_tokens: Any = None,
    val_loss_fn: Any = None, eval_fn: Any = None, forward_loss: Any = None, accuracy: Any = "auto",
) -> None:
    """Check ``fit``'s arguments (as documented there) before any training.

    Creates ``checkpoint_dir`` if needed and writes and removes a probe file in it.

    Raises:
        ValueError: naming every bad argument, its value, the rule and the fix.
    """
    errors: list[str] = []
    if lr is not None:
        errors += _positive_lr("lr", lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        if lr is None:  # given, lr replaces every group's LR
            for i, group in enumerate(optimizer.param_groups):
                errors += _positive_lr(f"optimizer.param_groups[{i}]['lr']", group.get("lr"))
        errors += _foreign_parameters(model, optimizer)
    for name, value, integral in (("epochs", epochs, False), ("max_steps", max_steps, True),
                                  ("max_samples", max_samples, True), ("max_tokens", max_tokens, True)):
        if value is not None:
            errors += _non_negative(name, value, integral)
    for name, value in (("data", data), ("val_data", val_data)):
        errors += _map_style(name, value)
    if device is not None:
        errors += _available(device)
    if checkpoint_dir is not None:
        errors += _writable(checkpoint_dir)
    errors += evaluation_errors(val_data, val_loss_fn, eval_fn, forward_loss, accuracy)
    if errors:
        raise ValueError("; ".join(errors))


def evaluation_errors(val_data: Any, val_loss_fn: Any, eval_fn: Any, forward_loss: Any, accuracy: Any) -> list[str]:
    """The problems with the settings of ``fit``'s default evaluation (module docstring)."""
    errors = accuracy_errors(accuracy, forward_loss)
    if accuracy in ("next_token", "same_position") and eval_fn is not None:
        errors.append(f"accuracy={accuracy!r} is given but eval_fn replaces the default evaluation that reads it; "
                      "compute the accuracy in eval_fn, or drop eval_fn")
    if val_loss_fn is None:
        return errors
    if not callable(val_loss_fn):
        errors.append(f"val_loss_fn must be a function f(output, target) -> scalar (got a {type(val_loss_fn).__name__}); "
                      "pass e.g. torch.nn.functional.cross_entropy")
    elif val_data is None:
        errors.append("val_loss_fn is given but there is no val_data to evaluate; pass val_data, or drop val_loss_fn")
    elif eval_fn is not None:
        errors.append("val_loss_fn is given but eval_fn replaces the default evaluation that calls it; compute the "
                      "loss in eval_fn, or drop eval_fn")
    elif forward_loss is not None:
        errors.append("val_loss_fn is given but forward_loss computes every loss, evaluations' included; pass eval_fn "
                      "for a validation loss of its own, or drop val_loss_fn")
    return errors


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_lr(name: str, value: Any) -> list[str]:
    if not _number(value):
        return [(f"{name} must be a number (got {name}={value!r}, a {type(value).__name__}); pass "
                f"a float, e.g. lr=0.1")]
    if not (math.isfinite(value) and value > 0):
        return [(f"{name} must be finite and > 0 (got {name}={value}); pass the base learning "
                "rate at initial_batch_size, e.g. 0.1 for SGD or 1e-3 for Adam")]
    return []


def _non_negative(name: str, value: Any, integral: bool) -> list[str]:
    kind = "an int" if integral else "a number"
    ok = (isinstance(value, numbers.Integral) if integral else _number(value)) and not isinstance(value, bool)
    if not ok:
        return [(f"{name} must be {kind} (got {name}={value!r}, a {type(value).__name__})")]
    if not (math.isfinite(value) and value >= 0):
        return [(f"{name} must be finite and >= 0 (got {name}={value}); pass how long to train, "
                "or None for no limit of this kind")]
    return []


def _foreign_parameters(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    own = {id(p) for p in model.parameters()}
    held = [p for group in opt.param_groups for p in group["params"]]
    foreign = sum(id(p) not in own for p in held)
    if not foreign:
        return []
    return [(f"the optimizer holds {foreign} of its {len(held)} parameters that are not this "
            "model's (built for another model, or for a copy of it); build it from "
            "model.parameters() of the model given to fit (a subset of them is fine)")]


def _map_style(name: str, data: Any) -> list[str]:
    ds = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(ds, IterableDataset):
        return []
    return [(f"{name} is an IterableDataset ({type(ds).__name__}), even with __len__ fit cannot "
            "draw the examples of each step itself; pass a map-style Dataset (ds[i] returns "
            "example i), a tuple of tensors, or a DataLoader over one")]


def _available(device: Any) -> list[str]:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        return [(f"device={device!r} is not a device ({err}); pass e.g. 'cpu', 'cuda' or 'cuda:0'")]
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return [(f"device={device!r} but this machine has no CUDA device (torch "
                    f"{torch.__version__}, CUDA build: {torch.version.cuda is not None}); pass "
                    "device='cpu' or None (the model's device)")]
        if dev.index is not None and dev.index >= count:
            return [(f"device={device!r} but this machine has {count} CUDA device(s) "
                    f"(cuda:0..cuda:{count - 1}); pass one of those")]
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return [(f"device={device!r} but MPS is not available here; pass device='cpu'")]
    return []


def _writable(checkpoint_dir: Any, name: str = "checkpoint_dir") -> list[str]:
    """Problems with the folder ``checkpoint_dir`` (called ``name`` in them): none once it
    exists and a file was written and removed in it. The CLI checks its ``--out`` with it."""
    path = Path(checkpoint_dir)
    if path.exists() and not path.is_dir():
        return [(f"{name}={str(path)!r} is an existing file, not a directory; pass a "
                "directory path (it is created if missing)")]
    probe = path / f".autobatch-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return [(f"{name}={str(path)!r} is not writable ({err.strerror or err}); pass a "
                "directory this process can create and write files in")]
    return []
