"""Resuming refuses a checkpoint that does not fit the run (autobatch.train._resume) before
anything of the caller's changes: other settings (every difference named in one error), another
model, data set or optimizer, counters or state edited; the bounds on the batch size may change
and are honoured from the first resumed step. Every checkpoint is written by a real fit."""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import autobatch
from autobatch.config import FitConfig
from autobatch.policies import BatchSizePolicy
from autobatch.train import checkpoint as ckpt_mod
from autobatch.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_run, save_checkpoint
from autobatch.train.controller import build_controller
from autobatch.train.sampler import SampleStream
from autobatch.train.step_norms import MeasureSchedule

FIX = r"Resume with the checkpoint's settings, or start fresh in another checkpoint_dir"
N = 512  # examples in the training set
STEPS = 16  # steps of the run that writes the checkpoint: its batch size grows 8 -> 16


def _model(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))


class _Steps(autobatch.Callback):
    def __init__(self) -> None:
        self.seen = 0

    def on_step_end(self, record) -> None:
        self.seen += 1


def _fit(model: nn.Module, data, directory: Path, *, resume: bool = False, max_steps: int = STEPS, **settings):
    args = dict(loss_fn=nn.functional.mse_loss, lr=0.01, initial_batch_size=8, decide_every=2, policy="gns",
                optimizer=functools.partial(torch.optim.SGD, momentum=0.9))
    return autobatch.fit(model, data, max_steps=max_steps, checkpoint_dir=directory, resume=resume, progress=False,
                         **{**args, **settings})


@pytest.fixture
def data(noise_data):
    return noise_data(N, 8, 0)  # targets unrelated to the inputs: a large noise scale, B grows


@pytest.fixture
def written(tmp_path, data) -> Path:
    """The folder of a checkpoint written by a 16-step fit, and the batch size it decided."""
    directory = tmp_path / "ckpt"
    result = _fit(_model(), data, directory)
    assert [r.batch_size for r in result.history][::5] == [8, 8, 8, 16]
    return directory


def _refused(model: nn.Module, data, directory: Path, match: str, **settings) -> None:
    """Resume with ``settings``: refused with ``match``, before any step, the model's weights, the
    global RNG and the checkpoint as they were."""
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    file = (directory / CHECKPOINT_NAME).read_bytes()
    steps = _Steps()
    with pytest.raises(ValueError, match=match):
        _fit(model, data, directory, resume=True, max_steps=30, callbacks=[steps], **settings)
    assert steps.seen == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert (directory / CHECKPOINT_NAME).read_bytes() == file


def _prefix(directory: Path) -> str:
    return rf"refusing to resume from checkpoint {re.escape(str(directory / CHECKPOINT_NAME))}: "


@pytest.mark.parametrize(("change", "shown"), [
    ({"initial_batch_size": 16}, "initial_batch_size: checkpoint 8, this run 16"),
    ({"policy": "budget"}, "policy: checkpoint 'gns', this run 'budget'"),
    ({"seed": 1}, "seed: checkpoint 0, this run 1"),
    ({"shuffle": False}, "shuffle: checkpoint True, this run False"),
])
def test_a_changed_setting_is_refused_before_anything_changes(written, data, change, shown) -> None:
    _refused(_model(), data, written, rf"{_prefix(written)}it was written with other settings .*{re.escape(shown)}.*"
             rf"{FIX}\. Only the stopping rules .* may change on resume", **change)


def test_every_changed_setting_is_named_in_one_error(written, data) -> None:
    with pytest.raises(ValueError) as err:
        _fit(_model(), data, written, resume=True, initial_batch_size=16, policy="fixed", seed=1, shuffle=False,
             lr=0.1, lr_scaling="sqrt", precision="bf16")
    message = str(err.value)
    for shown in ("initial_batch_size: checkpoint 8, this run 16", "policy: checkpoint 'gns', this run 'fixed'",
                  "lr_scaling: checkpoint 'adascale', this run 'sqrt'", "seed: checkpoint 0, this run 1",
                  "shuffle: checkpoint True, this run False", "lr: checkpoint [0.01], this run [0.1]",
                  "precision: checkpoint 'fp32', this run 'bf16'"):
        assert shown in message, (shown, message)


def test_a_lower_max_batch_size_is_honoured_from_the_first_resumed_step_with_a_warning(written, data) -> None:
    decided = load_checkpoint(written)["controller"]["batch_size"]
    assert decided > 16
    # eval_every, checkpoint_every and num_workers may change freely: no error, no warning of theirs
    with pytest.warns(UserWarning, match=rf"the checkpoint's batch size {decided} is outside this run's bounds "
                      r"\(min_batch_size=8, max_batch_size=16\); resuming at 16 from the first resumed step"):
        result = _fit(_model(), data, written, resume=True, max_steps=24, max_batch_size=16, eval_every=3,
                      checkpoint_every=2, num_workers=0)
    assert len(result.history) == 24
    assert [(r.batch_size, r.examples) for r in result.history[STEPS:]] == [(16, 16)] * 8


def test_a_checkpoint_of_another_model_shape_is_refused_naming_the_parameters(written, data) -> None:
    _refused(_model(width=32), data, written,
             rf"{_prefix(written)}.*model: 3 of 4 differ \(0\.weight: checkpoint \[16, 8\], this run \[32, 8\]; "
             rf"0\.bias: checkpoint \[16\], this run \[32\]; 2\.weight: checkpoint \[1, 16\], this run \[1, 32\]\)\)"
             rf".*{FIX}")


def test_a_checkpoint_of_another_data_set_size_is_refused_before_the_model_is_loaded(written, data) -> None:
    x, y = data
    _refused(_model(), (x[:500], y[:500]), written,
             rf"{_prefix(written)}.*num_examples: checkpoint {N}, this run 500.*{FIX}")


def test_a_checkpoint_of_another_optimizer_is_refused_before_any_step_and_leaves_it_as_it_was(written, data) -> None:
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    before = copy.deepcopy(adam.state_dict())
    _refused(model, data, written,
             rf"{_prefix(written)}.*optimizer: checkpoint 'torch\.optim\.sgd\.SGD', this run 'torch\.optim\.adam\.Adam'"
             rf".*{FIX}", optimizer=adam, lr=None)
    assert adam.state_dict() == before and "betas" in adam.param_groups[0]


def _edit(directory: Path, change: Callable[[dict], object]) -> None:
    state = load_checkpoint(directory)
    change(state)
    save_checkpoint(directory, state)


_EDITS = {  # what is edited, and the message (its {samples} and {epochs}: the checkpoint's)
    # the reported case: the run would "finish" at once, having trained nothing
    "epoch 1e9": (lambda s: s["stream"].update(epoch=int(1e9)),
                  r"its counters disagree \(the sample stream stands at epoch 1000000000, position {samples} of 512 "
                  r"examples \(512000000{samples} handed out\), but samples={samples}; epochs={epochs}, but the "
                  r"stream's epoch 1000000000 .*\), so the file was edited or damaged .* move it away to start fresh"),
    "epochs 1e9": (lambda s: s["result"].update(epochs=1e9),
                   r"its counters disagree \(epochs=1000000000\.0, but the stream's epoch 0 and position {samples} of "
                   r"512 make {epochs}; the controller's epoch={epochs}, the result's 1000000000\.0\)"),
    "samples": (lambda s: s["result"].update(samples=1000),
                r"its counters disagree \(samples=1000, but the history's steps hold {samples} examples"),
    "steps": (lambda s: s["result"].update(steps=1000),
              r"its counters disagree \(steps=1000, but the history holds 16 steps.*the controller's step=16, "
              r"the result's 1000"),
    "position": (lambda s: s["stream"].update(position=N),
                 r"its stream state does not load \(ValueError: a sample stream state at epoch 0, position 512 is "
                 r"outside the data"),
    "momentum buffer": (lambda s: s["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
                        r"its optimizer state does not fit this optimizer \(parameter 0's momentum_buffer has shape "
                        r"\(3,\), the parameter \(16, 8\)\); nothing was loaded"),
    "weight dtype": (lambda s: s["model"].update({"0.weight": s["model"]["0.weight"].double()}),
                     r"its model state does not fit this model \(every parameter and buffer must have the same name, "
                     r"shape and dtype; 1 of 4 differ \(0\.weight: checkpoint \(16, 8\) float64, this run \(16, 8\) "
                     r"float32\)\); nothing was loaded"),
    "rng": (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
            r"its RNG state does not load \(RuntimeError: .*\), so the file was edited or damaged; nothing was loaded"),
}


@pytest.mark.parametrize("edit", list(_EDITS))
def test_a_checkpoint_edited_or_damaged_is_refused_before_anything_changes(written, data, edit) -> None:
    change, message = _EDITS[edit]
    result = load_checkpoint(written)["result"]
    message = message.replace("{samples}", str(result["samples"])).replace("{epochs}", re.escape(str(result["epochs"])))
    _edit(written, change)
    _refused(_model(), data, written, _prefix(written) + message, epochs=3)


def _fresh_parts(cfg: FitConfig) -> dict:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    controller = build_controller(cfg, optimizer=optimizer, method="micro", base_batch_size=8, max_batch_size=N,
                                  micro_batch_size=None, min_micro_batches=1, num_examples=N)
    return dict(model=model, optimizer=optimizer, controller=controller, stream=SampleStream(N),
                measure_schedule=MeasureSchedule(8, base_batch=8), scheduler=None, scaler=None)


@pytest.mark.parametrize(("edit", "message"), [
    ("settings", r"initial_batch_size: checkpoint 8, this run 16"),
    ("counters", r"its counters disagree \(the sample stream stands at epoch 3"),
])
def test_a_sharded_checkpoint_is_checked_before_dcp_loads_anything(written, monkeypatch, edit, message) -> None:
    state = load_checkpoint(written)
    settings = dict(state["settings"])
    del state["model"], state["optimizer"]
    state["sharded"] = "sharded-0123456789ab"  # a sharded run's checkpoint names its DCP folder
    if edit == "settings":
        settings["initial_batch_size"] = 16
    else:
        state["stream"]["epoch"] = 3
    save_checkpoint(written, state)
    loads = []
    monkeypatch.setattr(ckpt_mod, "load_sharded", lambda *args: loads.append(args))
    cfg = FitConfig.from_any(None, initial_batch_size=8, decide_every=2, policy="gns")
    with pytest.raises(ValueError, match=_prefix(written) + ".*" + message):
        restore_run(written, settings=settings, sharded=True, **_fresh_parts(cfg))
    assert loads == []


class _StopIn(BatchSizePolicy):
    """Keeps B; raises KeyboardInterrupt (a second Ctrl-C) inside step ``at``, after its
    examples are counted and before it is recorded."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at

    def propose(self, ctx) -> int:
        return ctx.batch_size

    def observe(self, ctx) -> None:
        if ctx.step == self.at:
            raise KeyboardInterrupt


def test_an_interrupt_inside_a_step_leaves_the_last_checkpoint_which_resumes(tmp_path, data) -> None:
    directory = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), data, directory, policy=_StopIn(at=5), checkpoint_every=2)
    assert load_checkpoint(directory)["result"]["steps"] == 4  # not step 5, counted but never recorded
    result = _fit(_model(), data, directory, resume=True, max_steps=8, policy=_StopIn(), checkpoint_every=2)
    assert [r.step for r in result.history] == list(range(1, 9))
