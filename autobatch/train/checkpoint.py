"""Checkpoints of a fit: everything needed to continue bit-for-bit where it stopped.

One file, ``<checkpoint_dir>/last.pt``, written atomically (temp file + rename) so that a run
killed while saving still has the previous checkpoint. It holds the model and optimizer
state, the controller (batch size, micro-batch cap, estimator averages, policy state), the
sample stream position, every RNG the step uses (torch CPU and CUDA, numpy, Python), the
counters and the history so far.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_NAME", "capture_rng", "load_checkpoint", "restore_rng", "save_checkpoint"]

CHECKPOINT_NAME = "last.pt"
_FORMAT_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """The state of every random generator a training step may draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back a :func:`capture_rng` state."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/last.pt`` atomically and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    torch.save({"format_version": _FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """Read ``directory/last.pt``; None if there is none yet.

    Raises:
        ValueError: if the file was written by an incompatible autobatch version.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    # weights_only=False: the file holds numpy/python RNG states, and it is our own file.
    state = torch.load(path, map_location="cpu", weights_only=False)
    version = state.get("format_version")
    if version != _FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version={version}, this autobatch reads "
            f"{_FORMAT_VERSION}; resume with the autobatch version that wrote it or start fresh"
        )
    return state
