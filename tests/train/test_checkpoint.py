"""autobatch.train.checkpoint: RNG states and fit checkpoints that load with
``weights_only=True``, a fit resumed after a stop or a crash continuing the same run, crafted
files refused before anything runs, and durable atomic writes (kill -9 at random moments:
tests/subprocess/test_kill_resume.py)."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel
from torch import nn

import autobatch
from autobatch.train import checkpoint as ckpt_mod
from autobatch.train.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def _draws() -> tuple:
    """One draw from every generator a step may use (gaussians too: they cache a value)."""
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.normal(), random.random(),
            random.gauss(0, 1))


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves numpy's second gaussian cached (has_gauss=1)
    random.gauss(0, 1)  # and Python's (gauss_next)
    save_checkpoint(tmp_path, {"rng": capture_rng()})
    expected = _draws()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # elsewhere entirely
    assert _draws() != expected
    raw = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # plain data only
    assert raw["rng"]["numpy"]["has_gauss"] == 1 and raw["rng"]["numpy"]["key"].dtype == torch.int64
    restore_rng(load_checkpoint(tmp_path)["rng"])
    assert _draws() == expected


def test_a_fit_checkpoint_loads_with_weights_only_and_resumes_bit_for_bit(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    y = x.sum(1, keepdim=True) + torch.randn(300, 1, generator=g)

    def run(max_steps: int, directory: Path) -> tuple[nn.Module, autobatch.FitResult]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        res = autobatch.fit(model, (x, y), loss_fn=nn.functional.mse_loss, lr=0.02, max_steps=max_steps,
                            optimizer=lambda p, lr: torch.optim.Adam(p, lr=lr), initial_batch_size=8,
                            decide_every=2, val_data=(x[:50], y[:50]), eval_every=5, checkpoint_dir=directory,
                            resume=True, progress=False)
        return model, res

    full_model, full = run(30, tmp_path / "full")
    run(13, tmp_path / "part")
    raw = torch.load(tmp_path / "part" / CHECKPOINT_NAME, weights_only=True)
    assert raw["format_version"] == 3 and raw["result"]["steps"] == 13
    assert isinstance(raw["result"]["history"][0], dict)  # pydantic records stored as dicts
    resumed_model, resumed = run(30, tmp_path / "part")
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (resumed.steps, resumed.samples) == (full.steps, full.samples)


class _Metrics(BaseModel):
    loss: float


def test_numpy_scalars_and_pydantic_models_are_stored_as_plain_data(tmp_path) -> None:
    save_checkpoint(tmp_path, {"a": np.float64(1.5), "b": [np.int32(3)], "m": _Metrics(loss=0.25),
                               "keys": {np.int64(7): (np.float32(0.5), "x")}})
    state = load_checkpoint(tmp_path)
    assert state["a"] == 1.5 and type(state["a"]) is float
    assert state["b"] == [3] and type(state["b"][0]) is int
    assert state["m"] == {"loss": 0.25}
    assert state["keys"] == {7: (0.5, "x")} and type(next(iter(state["keys"]))) is int


def test_an_object_that_is_not_plain_data_is_refused_when_saving_and_nothing_is_written(tmp_path) -> None:
    save_checkpoint(tmp_path, {"step": 1})
    with pytest.raises(TypeError, match=r"cannot checkpoint state\['controller'\]\['policy'\]\['table'\]: it is "
                       r"a numpy.ndarray, .* store it as a tensor or plain data .*add_safe_globals"):
        save_checkpoint(tmp_path, {"step": 2, "controller": {"policy": {"table": np.zeros(3)}}})
    assert load_checkpoint(tmp_path)["step"] == 1  # the previous checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


class _Planted:
    """What an attacker would put in a checkpoint: unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_crafted_checkpoint_is_refused_on_resume_and_runs_nothing(tmp_path, writer) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    marker = tmp_path / "pwned"
    payload = {"format_version": 3, "model": {}, "rng": _Planted(marker)}
    with open(directory / CHECKPOINT_NAME, "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f)

    message = (rf"refusing to resume from checkpoint {directory / CHECKPOINT_NAME}: it holds objects "
               r"other than tensors and plain data \(.*\), and unpickling them could run code .* Move or "
               r"delete it to start fresh")
    with pytest.raises(ValueError, match=message):
        load_checkpoint(directory)
    model = nn.Linear(4, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        autobatch.fit(model, (torch.randn(32, 4), torch.randn(32, 1)), loss_fn=nn.functional.mse_loss, lr=0.1,
                      max_steps=3, checkpoint_dir=directory, resume=True, progress=False)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # The reference: the file really would have run code under the old weights_only=False
    # (a bare pickle runs it while torch reads what it takes for the format's magic number).
    with contextlib.suppress(RuntimeError):
        torch.load(directory / CHECKPOINT_NAME, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short"])
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path, content) -> None:
    (tmp_path / CHECKPOINT_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read checkpoint {tmp_path / CHECKPOINT_NAME} .* the file is "
                       r"damaged or not a checkpoint: move or delete it to start fresh"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("version", [1, 2])  # 2: before the run's settings were saved
def test_an_older_format_is_refused_with_the_version(tmp_path, version) -> None:
    torch.save({"format_version": version}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=rf"has format_version={version}, this autobatch reads 3"):
        load_checkpoint(tmp_path)


def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(f"rename {Path(src).name} -> {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    save_checkpoint(tmp_path, {"w": torch.ones(3)})
    expected = ["fsync file", "rename last.tmp -> last.pt"]
    assert events == ([*expected, "fsync dir"] if os.name == "posix" else expected)


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(1000)})

    def torn_save(obj, f) -> None:
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(1000)})
    state = load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert not (tmp_path / "last.tmp").exists()


def test_resume_gives_the_same_batch_sizes_order_and_weights(tmp_path, regression, mse) -> None:
    x, y = regression(n=600, noise=2.0)

    def run(max_steps, ckpt, resume=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 1))
        if resume:
            torch.manual_seed(123)  # a different global RNG: resume must restore it
            for p in model.parameters():
                nn.init.normal_(p)  # and different weights: resume must load them
        res = autobatch.fit(model, (x, y), loss_fn=mse, val_data=(x[:100], y[:100]), lr=0.02,
                            optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
                            max_steps=max_steps, initial_batch_size=16, decide_every=3,
                            checkpoint_dir=ckpt, resume=resume, eval_every=7, progress=False)
        return model, res

    full_model, full = run(60, tmp_path / "full")
    run(23, tmp_path / "part")  # stops at a step that is no eval point
    resumed_model, resumed = run(60, tmp_path / "part", resume=True)
    assert [r.batch_size for r in resumed.history] == [r.batch_size for r in full.history]
    assert len({r.batch_size for r in full.history}) > 1
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.steps == 60 and resumed.samples == full.samples


def test_a_crashed_run_resumes_from_its_last_periodic_checkpoint(tmp_path, regression, mse) -> None:
    x, y = regression(n=600, noise=2.0)

    class Crash(autobatch.Callback):
        def on_step_end(self, record):
            if record.step == 17:
                raise RuntimeError("simulated crash")

    def run(ckpt, callbacks=(), resume=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 1))
        res = autobatch.fit(model, (x, y), loss_fn=mse, lr=0.02, max_steps=40,
                            initial_batch_size=16, decide_every=3, checkpoint_dir=ckpt,
                            checkpoint_every=5, resume=resume, callbacks=callbacks, progress=False)
        return model, res

    full_model, full = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crash", callbacks=[Crash()])
    resumed_model, resumed = run(tmp_path / "crash", resume=True)  # continues from step 15
    assert resumed.history[14].step == 15 and len(resumed.history) == 40
    assert [r.batch_size for r in resumed.history] == [r.batch_size for r in full.history]
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
