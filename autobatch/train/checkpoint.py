"""Checkpoints of a fit: everything needed to continue bit-for-bit where it stopped.

One file, ``<checkpoint_dir>/last.pt``, written atomically: to a temporary file, flushed and
fsynced, renamed over the old one, and the directory fsynced (POSIX), so that a run killed
or a machine losing power while saving still has the previous checkpoint, never an empty
or half-written one. It holds the model and optimizer state, the controller (batch size,
micro-batch cap, estimator averages, policy state), the sample stream position, every RNG
the step uses (torch CPU and CUDA, numpy, Python), the counters and the history so far.

The file holds tensors and plain Python data only (dicts, lists, tuples, numbers, strings),
so it is read with ``torch.load(weights_only=True)``: a file planted in a shared checkpoint
directory cannot run code in the training process. Saving converts numpy scalars to Python
numbers and pydantic models to dicts; any other object in the state (a custom policy's
state, say) is refused when saving, naming where it is, unless its type was allowed with
``torch.serialization.add_safe_globals`` (which ``torch.load`` then accepts too).

Resuming continues the same run, so :func:`restore_run` first makes sure the checkpoint fits
this one, and only then touches the model, the optimizer, the controller, the sample stream
or the RNGs (:mod:`autobatch.train._resume`); each refusal is one ``ValueError`` naming the
file, what differs and the fix:

- the run's settings, saved with the checkpoint, must be this run's: every setting of the
  config (the policy and the LR rule as resolved) but those below, the base LRs, the LR
  scheduler's class, the data set size, the optimizer's class and param groups (the shape of
  each parameter), the model's parameter names and shapes, the loss-items mode and the
  precision. None depends on the number of processes: a checkpoint resumes on another;
- may change: the stopping rules (``epochs``, ``max_steps``, ``max_samples``: that is how a
  run is extended); ``max_batch_size`` and ``min_batch_size``, bounds honoured from the first
  resumed step (a checkpoint's batch size outside them is moved inside, with a warning); the
  memory settings (the smaller of the checkpoint's micro-batch cap and this run's applies);
  and ``progress``, ``eval_every``, ``log_every``, ``checkpoint_every``, ``num_workers``,
  ``max_nonfinite_steps`` (:data:`~autobatch.train._resume.MAY_CHANGE`);
- the counters must agree: steps with the history, samples with the history's steps and the
  sample stream's position, epochs with that position and the data set size;
- the model state must have this model's parameter and buffer names, shapes and dtypes, and
  the optimizer state this optimizer's groups, each state tensor shaped as its parameter; the
  controller's, measurement schedule's and stream's state are loaded into copies first.

A sharded run's model and optimizer are loaded by DCP (:mod:`autobatch.train.dcp`) after every
check on ``last.pt``'s own state passed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from autobatch.train._resume import check_counters, check_model_state, check_optimizer_state, check_settings
from autobatch.train.dcp import load_sharded, remove_stale_sharded, save_sharded

__all__ = ["CHECKPOINT_NAME", "capture_rng", "load_checkpoint", "restore_rng", "restore_run", "save_checkpoint",
           "save_run"]

CHECKPOINT_NAME = "last.pt"
# 3: the run's settings, compared on resume; 2: RNG states as tensors and plain types, read
# with weights_only=True (1 pickled numpy's).
_FORMAT_VERSION = 3


def capture_rng() -> dict[str, Any]:
    """The state of every random generator a training step may draw from, as tensors and
    plain Python types (so a checkpoint holding it loads with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            # MT19937's 624 uint32 words; int64 keeps them exact in a tensor
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next): plain already
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back a :func:`capture_rng` state."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/last.pt`` atomically and durably; return the path.

    Raises:
        TypeError: for an object in ``state`` that a ``weights_only`` load would refuse
            (the message says where it is and how to store it instead); nothing is written.
    """
    directory = Path(directory)
    payload = _plain({"format_version": _FORMAT_VERSION, **state}, "state")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """Read ``directory/last.pt`` with ``torch.load(weights_only=True)``; None if there is
    none yet. Tensors are loaded on the CPU.

    Raises:
        ValueError: for a file holding anything but tensors and plain data (refused
            unread: unpickling it could run code), a damaged file, or one written by an
            incompatible autobatch version; each message names the file and what to do.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line),
                      str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise ValueError(
            f"refusing to resume from checkpoint {path}: it holds objects other than tensors and "
            f"plain data ({reason}), and unpickling them could run code planted in the file. "
            "autobatch writes only tensors and plain data (files of autobatch versions before "
            f"checkpoint format {_FORMAT_VERSION} are refused too); if you did not put the file "
            "there, treat the directory as tampered with. Move or delete it to start fresh, or "
            "resume with the version that wrote it"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {err}); the file is damaged "
            "or not a checkpoint: move or delete it to start fresh"
        ) from err
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != _FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version={version}, this autobatch reads "
            f"{_FORMAT_VERSION}; resume with the autobatch version that wrote it or start fresh"
        )
    return state


# Types a weights_only load accepts as they are (tensors are checked apart, subclasses too).
_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size, torch.dtype,
          torch.device)


def _plain(obj: Any, where: str) -> Any:
    """``obj`` with numpy scalars as Python numbers and pydantic models as dicts; TypeError
    for anything else a weights_only load would refuse. ``where`` names obj in messages."""
    if type(obj) in _ATOMS or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.generic):  # np.float64 is a float subclass, but pickles as numpy's
        return obj.item()
    if isinstance(obj, BaseModel):
        return _plain(obj.model_dump(), where)
    if type(obj) in (dict, OrderedDict, Counter):
        return type(obj)((_plain(k, f"{where} key {k!r}"), _plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if type(obj) in (list, tuple, set):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    allowed = {g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()}
    if type(obj) in allowed:
        return obj
    raise TypeError(
        f"cannot checkpoint {where}: it is a {type(obj).__module__}.{type(obj).__qualname__}, and "
        "checkpoints hold only tensors and plain Python data (dict, list, tuple, numbers, str) so "
        "that resuming never unpickles code; store it as a tensor or plain data (e.g. in the "
        "state_dict() that returns it), or allow its type with torch.serialization.add_safe_globals"
    )


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX keeps directory entries apart from file data)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def save_run(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, controller: Any,
             measure_schedule: Any, stream: Any, scheduler: Any, scaler: Any, result: Any, settings: dict[str, Any],
             is_main: bool = True, sharded: bool = False) -> None:
    """Write a fit's whole state to ``directory/last.pt`` (see :func:`save_checkpoint`): the
    model and optimizer, the controller (batch size, estimator, policy), the measurement
    schedule, the sample stream's position, the user's LR scheduler and fp16 scaler (None
    without them), every RNG, the result so far (counters, history) and the run's settings.

    Args:
        settings: what gives the run its meaning (:func:`autobatch.train._resume.run_settings`),
            compared when it resumes.
        is_main: whether this process writes ``last.pt`` (rank 0 of a data-parallel run).
        sharded: the model is sharded with FSDP2: every process (call it on all) writes its
            shards of the model and optimizer with DCP (:mod:`autobatch.train.dcp`) and
            ``last.pt`` names their folder instead of holding them.
    """
    directory = Path(directory)
    if sharded:
        name = save_sharded(directory, model, optimizer)
        weights = {"sharded": name}
    else:
        weights = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if is_main:
        save_checkpoint(directory, {
            **weights,
            "settings": settings,
            "controller": controller.state_dict(),
            "measure_schedule": measure_schedule.state_dict(),
            "stream": stream.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": capture_rng(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "result": result.model_dump(exclude={"model"}),
        })
        if sharded:
            remove_stale_sharded(directory, keep=weights["sharded"])


def restore_run(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, controller: Any,
                measure_schedule: Any, stream: Any, scheduler: Any, scaler: Any, settings: dict[str, Any],
                sharded: bool = False) -> dict[str, Any] | None:
    """Load ``directory/last.pt`` (written by :func:`save_run`) into the given objects and
    the RNGs; return the saved result's fields (the counters and history so far), or None
    when there is no checkpoint yet. With ``sharded`` (call it on every process) the model
    and optimizer come from the DCP folder ``last.pt`` names, resharded to this run's processes.

    Nothing is changed until the checkpoint is known to fit (module docstring): its settings
    against ``settings`` (:func:`autobatch.train._resume.run_settings` of this run), its
    counters, its model and optimizer state against ``model`` and ``optimizer``; the other
    objects' state is loaded into copies first.

    Raises:
        ValueError: as :func:`load_checkpoint`; for a checkpoint written with other settings
            (naming every difference), of another model or optimizer, with counters that
            disagree, or written by a sharded run resumed unsharded (or the other way round).
    """
    directory = Path(directory)
    path = directory / CHECKPOINT_NAME
    ckpt = load_checkpoint(directory)
    if ckpt is None:
        return None
    if sharded != ("sharded" in ckpt):
        wrote, runs = ("a model sharded with fully_shard", "unsharded") if "sharded" in ckpt else (
            "an unsharded model (one process or DDP)", "sharded with fully_shard")
        raise ValueError(
            f"checkpoint {path} was written for {wrote}, and this run's model is {runs}; "
            "resume with the model laid out as when it was written, or start fresh in another checkpoint_dir"
        )
    check_settings(path, ckpt.get("settings"), settings)
    parts = {"controller": controller, "measure_schedule": measure_schedule, "stream": stream}
    _load_into_copies(path, ckpt, parts)
    check_counters(path, ckpt)
    if not sharded:
        check_model_state(path, ckpt["model"], model)
        check_optimizer_state(path, ckpt["optimizer"], optimizer)
    _check_rng(path, ckpt["rng"])
    # Everything fits: from here on nothing is refused (but by DCP, reading its own files).
    if sharded:
        load_sharded(directory, ckpt["sharded"], model, optimizer)
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    for key, obj in parts.items():
        obj.load_state_dict(ckpt[key])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    restore_rng(ckpt["rng"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["result"]


def _load_into_copies(path: Path, ckpt: dict[str, Any], parts: dict[str, Any]) -> None:
    """Load each part's state into a copy of it, so that a state that does not load is
    refused before anything is changed."""
    for key, obj in parts.items():
        try:
            with warnings.catch_warnings():  # the real load warns
                warnings.simplefilter("ignore")
                copy.deepcopy(obj).load_state_dict(ckpt[key])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"refusing to resume from checkpoint {path}: its {key} state does not load ({type(err).__name__}: "
                f"{err}), so the file was edited or damaged; nothing was loaded. Resume from a copy you trust, or move "
                "it away to start fresh"
            ) from None


def _check_rng(path: Path, state: dict[str, Any]) -> None:
    """Refuse RNG states that do not load: tried, then the current ones put back."""
    current = capture_rng()
    try:
        restore_rng(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise ValueError(
            f"refusing to resume from checkpoint {path}: its RNG state does not load ({type(err).__name__}: {err}), so "
            "the file was edited or damaged; nothing was loaded. Resume from a copy you trust, or move it away to "
            "start fresh"
        ) from None
    finally:
        restore_rng(current)
