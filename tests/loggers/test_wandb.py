"""The Weights & Biases logger in offline mode (no network): the run's own file read back."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

from autobatch.loggers.wandb import WandbLogger  # noqa: E402

pytestmark = pytest.mark.slow  # W&B starts a service process: a few seconds


def _records(path: Path) -> list:
    """The protobuf records of an offline run's ``.wandb`` file: a LevelDB-style log (a 7-byte
    header, then records of checksum, length, type and data in 32 KiB blocks)."""
    data, pos, records, part = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def _history(path: Path, timeout_s: float = 60.0) -> list[dict]:
    """The history rows of a finished offline run, once its service has written the file to
    its exit record (``run.finish()`` may return before)."""
    deadline = time.monotonic() + timeout_s
    records = _records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.2)
        records = _records(path)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_steps_reach_an_offline_run_under_the_stable_names(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(tmp_path, project="autobatch-test")
    logger.log({"train/batch_size": 16, "gns/noise_scale": 40.5}, 1)
    logger.log({"train/batch_size": 32, "gns/noise_scale": 41.5}, 2)
    logger.log({"val/loss": 0.5}, 2)
    logger.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = _history(run_file)
    assert [(r["_step"], r["train/batch_size"], r["gns/noise_scale"]) for r in rows if "train/batch_size" in r] == [
        (1, 16, 40.5), (2, 32, 41.5)]
    assert any(r.get("val/loss") == 0.5 and r["_step"] == 2 for r in rows)
