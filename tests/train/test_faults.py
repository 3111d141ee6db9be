"""What ``autobatch.fit`` does when things go wrong inside it (docs/faults.md): non-finite
steps, bad settings, fp16 overflows (real signals: tests/subprocess/test_interrupt_resume.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import autobatch
from autobatch.train import loop


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


def test_a_skipped_step_leaves_batchnorm_statistics_as_before_warns_once_and_is_counted(noise_data) -> None:
    x, y = noise_data(256, 8, 1)
    clean = _bn_model()
    # one micro-batch per step (gns_method="off" splits no step), so one forward per step
    ref = autobatch.fit(clean, (x.clone(), y), loss_fn=nn.functional.mse_loss, lr=0.01, epochs=1,
                        initial_batch_size=32, policy="fixed", shuffle=False, gns_method="off", lr_scaling="none",
                        progress=False)
    x[[40, 41, 200]] = float("nan")  # rows of steps 2 and 7 (no shuffle, B = 32)
    model = _bn_model()
    with pytest.warns(RuntimeWarning, match=r"skipped optimizer step 2 \(epoch 0\.25\): the loss is nan") as seen:
        res = autobatch.fit(model, (x, y), loss_fn=nn.functional.mse_loss, lr=0.01, epochs=1,
                            initial_batch_size=32, policy="fixed", shuffle=False, gns_method="off", lr_scaling="none",
                            progress=False)
    assert sum("skipped optimizer step" in str(w.message) for w in seen) == 1  # once
    assert res.skipped_steps == 2 and [r.step for r in res.history if r.skipped] == [2, 7]
    bn = model[1]
    assert all(torch.isfinite(b).all() for b in model.buffers())
    # the reference: a run that saw only the 6 finite steps' batches, in the same order
    steps = [i for i in range(8) if i not in (1, 6)]
    again = _bn_model()
    opt = torch.optim.SGD(again.parameters(), lr=0.01)
    for i in steps:
        opt.zero_grad()
        nn.functional.mse_loss(again(x[32 * i: 32 * i + 32]), y[32 * i: 32 * i + 32]).backward()
        opt.step()
    assert int(bn.num_batches_tracked) == 6
    torch.testing.assert_close(bn.running_mean, again[1].running_mean)
    torch.testing.assert_close(bn.running_var, again[1].running_var)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert int(clean[1].num_batches_tracked) == 8 and ref.skipped_steps == 0


def test_an_fp16_overflow_with_gradscaler_skips_the_step_and_lowers_the_scale(monkeypatch, noise_data) -> None:
    # fp16 needs CUDA in fit; this torch build runs fp16 autocast and GradScaler("cpu") on the
    # CPU, so the same code path runs here with the CPU scaler.
    scalers = []

    def fp16_on_cpu(precision, device):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000))
        return torch.float16, scalers[-1]

    monkeypatch.setattr(loop, "setup_precision", fp16_on_cpu)
    x, y = noise_data(128, 8, 2)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    done = [0]

    class Count(autobatch.Callback):
        def on_step_end(self, record) -> None:
            done[0] = record.step

    def overflow_on_chosen_steps(grad):  # an fp16 overflow: inf in the gradient of steps 3 and 5
        return grad * float("inf") if done[0] + 1 in (3, 5) else grad

    model.weight.register_hook(overflow_on_chosen_steps)
    with pytest.warns(RuntimeWarning, match=r"skipped optimizer step 3 .*the gradient is (inf|nan)"):
        res = autobatch.fit(model, (x, y), loss_fn=nn.functional.mse_loss, lr=0.01, max_steps=6,
                            initial_batch_size=16, policy="fixed", lr_scaling="none", callbacks=[Count()],
                            precision="fp16", progress=False)
    assert [r.skipped for r in res.history] == [False, False, True, False, True, False]
    assert scalers[0].get_scale() == 2.0**10 / 4  # halved by each overflow
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):  # never reached: fit refuses an IterableDataset before reading it
        return iter(zip(torch.zeros(64, 8), torch.zeros(64, 1)))

    def __len__(self) -> int:
        return 64


def _sgd(lr):
    def build(model):  # torch checks lr < 0 when building, not when it is set later
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.param_groups[0]["lr"] = lr
        return opt
    return build


def _two_groups(model):
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    opt.param_groups[1]["lr"] = -1.0
    return opt


@pytest.mark.parametrize(("setting", "match"), [
    ({"lr": float("inf")}, r"lr must be finite and > 0 \(got lr=inf\)"),
    ({"lr": -0.1}, r"lr must be finite and > 0 \(got lr=-0.1\)"),
    ({"lr": "0.1"}, r"lr must be a number > 0 or 'auto' \(got lr='0.1'\)"),
    ({"lr": None, "optimizer": _sgd(-0.1)}, r"optimizer.param_groups\[0\]\['lr'\] must be finite and > 0 \(got .*=-0.1\)"),
    ({"lr": None, "optimizer": _two_groups}, r"param_groups\[1\]\['lr'\] must be finite and > 0 \(got .*=-1.0\)"),
    ({"optimizer": lambda m: torch.optim.SGD(nn.Linear(8, 1).parameters(), lr=0.1)},
     r"the optimizer holds 2 of its 2 parameters that are not this model's"),
    ({"epochs": -1}, r"epochs must be finite and >= 0 \(got epochs=-1\)"),
    ({"max_steps": -5}, r"max_steps must be finite and >= 0 \(got max_steps=-5\)"),
    ({"max_samples": -64}, r"max_samples must be finite and >= 0 \(got max_samples=-64\)"),
    ({"data": _Stream()}, r"data is an IterableDataset \(_Stream\), even with __len__"),
    ({"device": "cuda:7" if torch.cuda.is_available() else "cuda"}, r"device='cuda(:7)?' but this machine has"),
    ({"accuracy": "next"}, r"accuracy must be 'auto', 'next_token', 'same_position' or False \(got accuracy='next'\)"),
    ({"accuracy": "next_token", "forward_loss": lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])},
     r"accuracy='next_token' needs the model's outputs, which forward_loss hides"),
    ({"accuracy": "same_position", "eval_fn": lambda m: {}},
     r"accuracy='same_position' is given but eval_fn replaces the default evaluation that reads it"),
    ({"val_loss_fn": nn.functional.l1_loss}, r"val_loss_fn is given but there is no val_data to evaluate"),
    ({"val_loss_fn": nn.functional.l1_loss, "val_data": (torch.zeros(4, 8), torch.zeros(4, 1)),
      "eval_fn": lambda m: {}}, r"val_loss_fn is given but eval_fn replaces the default evaluation"),
    ({"val_loss_fn": "l1"}, r"val_loss_fn must be a function f\(output, target\) -> scalar \(got a str\)"),
])
def test_a_bad_setting_is_refused_before_the_first_step(setting, match, noise_data) -> None:
    model = nn.Linear(8, 1)
    before = [p.detach().clone() for p in model.parameters()]
    steps = []

    class Count(autobatch.Callback):
        def on_step_end(self, record) -> None:
            steps.append(record.step)

    kwargs = {"lr": 0.1, "max_steps": 3, "data": noise_data(64, 8, 3), **setting}
    if callable(kwargs.get("optimizer")):
        kwargs["optimizer"] = kwargs["optimizer"](model)
    data = kwargs.pop("data")
    with pytest.raises(ValueError, match=match):
        autobatch.fit(model, data, loss_fn=nn.functional.mse_loss, initial_batch_size=8,
                      callbacks=[Count()], progress=False, **kwargs)
    assert steps == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _float64_inputs(xv, yv):
    return xv.double(), yv


def _a_label_out_of_range(xv, yv):  # deep in val_data, not in the first examples
    yv = yv.clone()
    yv[30] = 5
    return xv, yv


def _a_feature_missing(xv, yv):
    return xv[:, :3], yv


@pytest.mark.parametrize(("spoil", "match"), [
    (_float64_inputs, r"val_data cannot be evaluated: its first 2 examples through the model and loss_fn raised "
                      r"RuntimeError: .*Double.* \(val_data holds float64 tensors where the model's parameters are "
                      r"float32: convert them, e.g. X_val\.to\(torch\.float32\)\)\. Every evaluation runs val_data "
                      r"through them, as training runs data: give it the form, dtypes and targets of data"),
    (_a_label_out_of_range, r"val_data cannot be evaluated: example 30 \(target 5, outside the 3 classes the model's "
                            r"logits score\) through the model and loss_fn raised IndexError: Target 5 is out of bounds"),
    (_a_feature_missing, r"val_data cannot be evaluated: .*raised RuntimeError: mat1 and mat2 shapes cannot be "
                         r"multiplied \(2x3 and 4x16\)"),
])
def test_val_data_that_cannot_be_evaluated_is_refused_before_the_first_step(spoil, match) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(3, (64,), generator=g)
    xv, yv = spoil(torch.randn(40, 4, generator=g), torch.randint(3, (40,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    steps = []

    class Count(autobatch.Callback):
        def on_step_end(self, record) -> None:
            steps.append(record.step)

    with pytest.raises(ValueError, match=match):
        autobatch.fit(model, (x, y), loss_fn=nn.functional.cross_entropy, val_data=(xv, yv), lr=0.1, epochs=1,
                      initial_batch_size=8, callbacks=[Count()], progress=False)
    assert steps == [] and model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_an_optimizer_over_a_subset_of_the_parameters_is_allowed(noise_data) -> None:
    model = nn.Linear(8, 1)
    bias = model.bias.detach().clone()
    res = autobatch.fit(model, noise_data(64, 8, 3), loss_fn=nn.functional.mse_loss, lr=0.1, max_steps=2,
                        optimizer=torch.optim.SGD([model.weight], lr=0.1), initial_batch_size=8,
                        progress=False)
    assert res.steps == 2 and torch.equal(model.bias, bias)  # the rest stays frozen


def test_a_checkpoint_dir_that_is_a_file_or_not_writable_is_refused_before_the_first_step(
        tmp_path, monkeypatch, noise_data) -> None:
    def run(directory, steps=3):
        return autobatch.fit(nn.Linear(8, 1), noise_data(64, 8, 3), loss_fn=nn.functional.mse_loss, lr=0.1,
                             max_steps=steps, initial_batch_size=8, checkpoint_dir=directory,
                             progress=False)

    fresh = tmp_path / "new" / "dir"
    run(fresh, steps=1)
    assert [p.name for p in fresh.iterdir()] == ["last.pt"]  # created; the probe file removed
    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(ValueError, match=r"checkpoint_dir='.*a_file' is an existing file, not a directory"):
        run(file)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes into read-only directories: refuse as the OS would
            def refuse(self, data):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            monkeypatch.setattr(Path, "write_bytes", refuse)
        with pytest.raises(ValueError, match=r"checkpoint_dir='.*locked' is not writable \(Permission denied\)"):
            run(locked)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(("name", "budgets"), [("cnn", (110_000, 130_000, 200_000)), ("mlp", (42_000, 47_000))])
def test_the_probed_micro_batch_runs_in_fits_step_under_the_same_budget(name, budgets) -> None:
    # issue 15: the probe said micro-batch 1 fits 110 kB on the CNN and fit's own step then ran
    # out of memory. The probe's size must run in fit's step with no OOM retry.
    from autobatch.memory.probe import probe_memory
    from autobatch.problems import mnist1d

    (x, y), _ = mnist1d.make_data(num_samples=400)

    def make():
        torch.manual_seed(0)
        if name == "cnn":
            return mnist1d.make_cnn()
        return nn.Sequential(nn.Flatten(), nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))

    for budget in budgets:
        probed = probe_memory(make(), (x, y), nn.functional.cross_entropy, budget_bytes=budget,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.01)).max_micro_batch_size
        assert 1 <= probed < 16  # the step of 16 needs several micro-batches
        res = autobatch.fit(make(), (x, y), loss_fn=nn.functional.cross_entropy, lr=0.01, max_steps=6,
                            initial_batch_size=16, policy="fixed", memory_budget=budget, progress=False)
        assert (res.max_micro_batch_size, res.oom_retries) == (probed, 0), (budget, probed)


def test_non_finite_steps_are_skipped_counted_and_bounded(regression, mse) -> None:
    x, y = regression(n=256)
    x[5] = float("nan")  # one poisoned example: the steps holding it are skipped
    model = nn.Linear(8, 1)
    res = autobatch.fit(model, (x, y), loss_fn=mse, lr=0.01, epochs=2, initial_batch_size=32,
                        policy="fixed", progress=False)
    assert res.skipped_steps == 2
    assert sum(r.skipped for r in res.history) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    bad = (torch.full((64, 8), float("nan")), torch.zeros(64, 1))
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row.*max_nonfinite_steps=3"):
        autobatch.fit(nn.Linear(8, 1), bad, loss_fn=mse, lr=0.1, epochs=5, initial_batch_size=8,
                      max_nonfinite_steps=3, progress=False)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(data=(torch.zeros(0, 8), torch.zeros(0, 1))), ValueError, "empty"),
        (dict(initial_batch_size=1000), ValueError, "initial_batch_size=1000 is larger than the training set"),
        (dict(initial_batch_size=32, min_batch_size=64, max_batch_size=16), ValueError,
         "max_batch_size must be >= min_batch_size"),
        (dict(policy="bogus"), ValueError, "unknown policy 'bogus'; allowed: budget, fixed, gns, goodput, measure, ramp"),
        (dict(loss_fn=lambda o, t: (o - t) ** 2), ValueError, r"scalar tensor \(got a tensor of shape \(8, 1\)\)"),
        (dict(epochs=None), ValueError, "give epochs, max_steps, max_samples or max_tokens"),
        (dict(lr=None), ValueError, "lr is required"),
        (dict(data=(torch.zeros(64, 8, device="meta"), torch.zeros(64, 1, device="meta"))), ValueError,
         "model is on cpu but the data tensors are on meta"),
    ],
)
def test_bad_inputs_are_named(kwargs, exc, match, regression, mse) -> None:
    x, y = regression(n=64)
    args = dict(data=(x, y), loss_fn=mse, lr=0.1, epochs=1, initial_batch_size=16, progress=False)
    args.update(kwargs)
    data = args.pop("data")
    with pytest.raises(exc, match=match):
        autobatch.fit(nn.Linear(8, 1), data, **args)


def test_frozen_model_is_rejected(regression, mse) -> None:
    model = nn.Linear(8, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        autobatch.fit(model, regression(64), loss_fn=mse, lr=0.1, epochs=1)
