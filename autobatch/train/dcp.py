"""The sharded half of a checkpoint: an FSDP2 model and its optimizer through
``torch.distributed.checkpoint`` (DCP), each process writing its own shards, loaded back on any
number of processes (DCP reshards), and never unpickling code.

A sharded fit's checkpoint is ``checkpoint_dir/last.pt`` (autobatch's own state, as for any
fit: :mod:`autobatch.train.checkpoint`) naming a folder ``checkpoint_dir/sharded-<id>/`` of DCP
files. :func:`save_sharded` writes a new folder under a temporary name, renames it, and only
then (the caller) replaces ``last.pt``; the folders ``last.pt`` no longer names are removed
after. A run killed at any moment leaves ``last.pt`` naming a complete folder.

Loading is safe against crafted files: DCP's own reader unpickles its ``.metadata`` file with
``pickle.load`` and the non-tensor values (optimizer hyperparameters) with
``torch.load(weights_only=False)``, either of which runs code a planted file holds. Here the
metadata goes through an unpickler that accepts only the classes DCP metadata is made of, and
the values through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SHARDED_PREFIX", "load_sharded", "remove_stale_sharded", "save_sharded"]

SHARDED_PREFIX = "sharded-"

# Everything a DCP .metadata file of model and optimizer state holds (torch 2.13): the
# metadata classes, storage descriptions, sizes, dtypes, layouts and paths.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            obj = torch.load(value, weights_only=True)  # numbers, strings, lists, dicts, tensors
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Write the model's and optimizer's shards (every process, a collective) to a new folder
    of ``directory``; return its name, for ``last.pt`` to name once it is written."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    names = [f"{SHARDED_PREFIX}{uuid.uuid4().hex[:12]}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)  # every process writes into the same folder
    name = names[0]
    tmp = directory / f"{name}.tmp"
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    dist.barrier()  # every shard and the metadata are on disk
    if dist.get_rank() == 0:
        tmp.rename(directory / name)
    dist.barrier()
    return name


def remove_stale_sharded(directory: Path, keep: str) -> None:
    """Remove the shard folders (complete or not) that ``last.pt`` does not name (rank 0)."""
    for path in directory.glob(f"{SHARDED_PREFIX}*"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def load_sharded(directory: Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the shards of folder ``name`` into the sharded model and its optimizer, on however
    many processes run now (DCP reshards; a collective).

    Raises:
        ValueError: for a missing folder, or a file that is not a DCP checkpoint of plain data.
    """
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = directory / name
    if not (path / ".metadata").exists():
        raise ValueError(f"checkpoint {directory / 'last.pt'} names the shard folder {path}, which is missing or "
                         "incomplete; restore it, or move the checkpoint away to start fresh")
    model_state, optim_state = get_state_dict(model, optimizer)  # templates of this run's layout
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, storage_reader=_safe_reader(path), planner=_safe_planner())
    except BaseException as err:  # DCP wraps the ranks' errors in a BaseException subclass
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        raise ValueError(
            f"refusing to resume from the sharded checkpoint {path}: {_first_line(err)}. Its metadata may hold "
            "objects other than plain data (unpickling them could run code planted in the file) or be damaged; "
            "move the checkpoint directory away to start fresh"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        if "refusing" in line or "not part of" in line or "Unpickling" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(err).__name__
