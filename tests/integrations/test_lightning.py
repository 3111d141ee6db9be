"""AdaptiveBatchSize, the Lightning callback, on an unchanged LightningModule and DataLoader."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

import autobatch
from autobatch.integrations.lightning import AdaptiveBatchSize, accumulation_setting
from autobatch.policies import BatchSizePolicy
from autobatch.train.results import StepRecord
from tests.helpers.guard_reference import smoothed_loss
from tests.helpers.lightning_regression import (
    Regression,
    loader,
    loss_fn,
    quiet_trainer,
    regression_data,
)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    # Lightning's tips about workers, loggers and resumable loaders are not under test.
    warnings.filterwarnings("ignore", module="lightning")


def _fit(model, data, cb, ckpt_path=None, **trainer_kwargs) -> pl.Trainer:
    trainer = quiet_trainer(callbacks=[cb, *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def test_accumulation_setting_makes_lightning_zero_and_step_exactly_at_the_step_ends() -> None:
    # Lightning's rules (training_epoch_loop / automatic optimization), simulated for every
    # step layout an epoch can hold: zero_grad where batch_idx % a == 0, step where
    # (batch_idx + 1) % a == 0.
    for start in range(40):
        for k in range(1, 9):
            for j in range(k):
                i = start + j
                a, zero_yourself = accumulation_setting(i, j, k)
                zeroes = i % a == 0 or zero_yourself
                steps = (i + 1) % a == 0
                assert zeroes == (j == 0), (start, k, j, a)
                assert steps == (j == k - 1), (start, k, j, a)
                assert not (zero_yourself and i % a == 0)


def test_b_grows_and_follows_fit_on_the_same_model_data_and_seed() -> None:
    x, y = regression_data()
    torch.manual_seed(0)
    module = Regression()
    torch.manual_seed(0)
    reference = Regression()
    cb = AdaptiveBatchSize(decide_every=5, max_batch_size=1024, policy="gns")
    _fit(module, loader(x, y, batch_size=16), cb, max_epochs=2)
    # fit with the callback's layout: micro-batches of 16 (the DataLoader's), B0 = 2 x 16,
    # B a multiple of 16.
    res = autobatch.fit(reference.net, (x, y), loss_fn=loss_fn, lr=0.05, epochs=2, initial_batch_size=32,
                        max_micro_batch_size=16, round_to=16, decide_every=5, max_batch_size=1024,
                        policy="gns")
    ours, theirs = cb.history, res.history
    assert all(isinstance(r, StepRecord) for r in ours)
    assert max(r.batch_size for r in ours) >= 4 * 32  # B grew as the noise scale did
    # Through the first epoch the runs take the same steps on the same examples: same B, same
    # micro-batches, same loss (up to float rounding of the loss weights).
    first_epoch = [r.step for r in theirs if r.epoch < 1.0]
    assert len(first_epoch) > 100 and len({r.batch_size for r in theirs[: len(first_epoch)]}) >= 3
    for a, b in zip(ours[: len(first_epoch)], theirs[: len(first_epoch)]):
        assert (a.batch_size, a.examples, a.accum_steps) == (b.batch_size, b.examples, b.accum_steps)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.noise_scale == pytest.approx(b.noise_scale, rel=1e-4, nan_ok=True)
    # At an epoch's end fit splits a short last step into two micro-batches (16 -> 8 + 8)
    # where Lightning's DataLoader holds one micro-batch of 16, which then gives no estimate;
    # from there the estimates differ a little and B may change one decision earlier or later.
    window = cb.controller.decide_every
    fit_b = [r.batch_size for r in theirs]
    compared = [r for r in ours if r.step + window <= len(fit_b)]
    assert len(compared) > len(first_epoch) + 20
    for r in compared:
        near = fit_b[max(0, r.step - 1 - window) : r.step + window]  # steps s - w .. s + w
        assert min(near) <= r.batch_size <= max(near), (r.step, r.batch_size, near)


class _Alternating(BatchSizePolicy):
    """Proposes 32, 48, 80, 16, ... in turn: steps that start off Lightning's accumulation
    grid and odd micro-batch counts."""

    def __init__(self) -> None:
        self.sizes, self.calls = [48, 80, 16, 64, 32], 0

    def propose(self, ctx):
        self.calls += 1
        return self.sizes[self.calls % len(self.sizes)]


class _StepGradients(pl.Callback):
    """Per optimizer step: the examples of its micro-batches, the parameters before the step
    and the gradient the optimizer gets."""

    def __init__(self) -> None:
        self.steps, self._batches = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batches.append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        x = torch.cat([b[0] for b in self._batches])
        y = torch.cat([b[1] for b in self._batches])
        self.steps.append((params, grads, x, y, [len(b[0]) for b in self._batches]))
        self._batches = []


def test_the_accumulated_gradient_is_the_global_batch_mean_on_and_off_the_grid() -> None:
    # 1000 examples in micro-batches of 16: the epoch ends with a micro-batch of 8, and the
    # policy jumps between 1, 2, 3, 4 and 5 micro-batches per step.
    x, y = regression_data(n=1000)
    module = Regression()
    probe = _StepGradients()
    cb = AdaptiveBatchSize(policy=_Alternating(), decide_every=1, min_batch_size=16, max_batch_size=80,
                           initial_batch_size=32, lr_scaling="none")
    _fit(module, loader(x, y, batch_size=16), cb, max_epochs=2, callbacks=[probe])
    assert {len(s[4]) for s in probe.steps} >= {1, 2, 3, 4, 5}
    assert any(sizes[-1] == 8 for *_, sizes in probe.steps)  # the epoch's short tail
    reference = Regression()
    for params, grads, x_step, y_step, _ in probe.steps:
        reference.load_state_dict(params)
        reference.zero_grad()
        loss_fn(reference.net(x_step), y_step).backward()  # one backward over the whole step
        for name, p in reference.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)
    assert [r.examples for r in cb.history] == [len(s[2]) for s in probe.steps]


def test_resuming_from_a_lightning_checkpoint_continues_the_same_run(tmp_path) -> None:
    x, y = regression_data(n=2048, noise=2.0)  # noisier labels: B grows within the first epoch

    def run(max_steps: int = -1, ckpt_path=None, checkpoints=None) -> AdaptiveBatchSize:
        torch.manual_seed(0)
        cb = AdaptiveBatchSize(decide_every=5, max_batch_size=512)
        extra = {"callbacks": [checkpoints], "enable_checkpointing": True} if checkpoints else {}
        _fit(Regression(), loader(x, y, batch_size=16), cb, max_epochs=2, max_steps=max_steps,
             ckpt_path=ckpt_path, **extra)
        return cb

    full = run()
    run(max_steps=65, checkpoints=ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=60, save_top_k=-1))
    (ckpt,) = tmp_path.glob("*step=60*")
    assert torch.load(ckpt, weights_only=False)["callbacks"]["AdaptiveBatchSize"]["cursor"]
    resumed = run(ckpt_path=str(ckpt))
    assert full.history[59].batch_size != full.history[0].batch_size  # B had moved by then
    assert [r.batch_size for r in resumed.history] == [r.batch_size for r in full.history]
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in full.history]


class _Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    name, version = "recorder", "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class _Decay(Regression):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8 ** (s // 20))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_the_lr_factor_multiplies_the_users_schedule_and_reaches_the_loggers() -> None:
    x, y = regression_data(n=2048, noise=2.0)
    module, logger = _Decay(), _Recorder()
    cb = AdaptiveBatchSize(decide_every=5, max_batch_size=512)
    trainer = _fit(module, loader(x, y, batch_size=16), cb, max_epochs=2, logger=logger, log_every_n_steps=1)
    factors = [row["train/lr_factor"] for row in logger.rows if "train/lr_factor" in row]
    assert len(factors) == len(cb.history) and max(factors) > 1.0  # AdaScale's gain once B grew
    for rec, factor in zip(cb.history, factors):
        scheduled = 0.05 * 0.8 ** ((rec.step - 1) // 20)  # LambdaLR's own value at this step
        assert rec.lr == pytest.approx(scheduled * factor, rel=1e-6)
    # the scheduler kept its own values: the factor never compounded into them
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.8 ** (len(cb.history) // 20))
    logged_b = [row["train/batch_size"] for row in logger.rows if "train/batch_size" in row]
    assert logged_b == [float(r.batch_size) for r in cb.history]
    assert any("gns/noise_scale" in row for row in logger.rows)
    # the LR before the batch factor is recorded: the user's schedule
    assert [r.base_lr for r in cb.history] == pytest.approx([0.05 * 0.8 ** ((r.step - 1) // 20) for r in cb.history])


def test_lightnings_tensorboard_logger_gets_fits_names(tmp_path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from lightning.pytorch.loggers import TensorBoardLogger

    x, y = regression_data(n=1024, noise=2.0)
    cb = AdaptiveBatchSize(decide_every=5, max_batch_size=256)
    tb = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = _fit(Regression(), loader(x, y, batch_size=16), cb, max_epochs=2, logger=tb, log_every_n_steps=1)
    events = event_accumulator.EventAccumulator(tb.log_dir)
    events.Reload()
    names = set(events.Tags()["scalars"])
    assert {"train/batch_size", "train/micro_batch_size", "train/lr", "train/loss", "train/examples", "train/epoch",
            "gns/noise_scale", "gns/noise_scale_stderr", "gns/grad_sq", "gns/trace_sigma", "train/lr_factor"} <= names
    by_step = {r.step: r for r in cb.history}
    logged = events.Scalars("train/batch_size")
    assert [e.step for e in logged] == [r.step for r in cb.history] and trainer.global_step == cb.history[-1].step
    assert all(e.value == by_step[e.step].batch_size for e in logged)
    assert all(e.value == pytest.approx(by_step[e.step].samples) for e in events.Scalars("train/examples"))
    assert all(e.value == pytest.approx(by_step[e.step].noise_scale, rel=1e-6) for e in events.Scalars("gns/noise_scale"))


def test_measure_mode_keeps_the_trainers_batch_and_lr_and_logs_the_noise_scale() -> None:
    x, y = regression_data(n=2048, noise=2.0)
    cb, logger = AdaptiveBatchSize(policy="measure", decide_every=5), _Recorder()
    _fit(_Decay(), loader(x, y, batch_size=16), cb, max_epochs=2, logger=logger, log_every_n_steps=1)
    assert {r.batch_size for r in cb.history} == {32}  # B0: two micro-batches of the DataLoader's 16
    assert all(r.lr == pytest.approx(r.base_lr) for r in cb.history)  # the batch factor stays 1
    assert [r.base_lr for r in cb.history] == pytest.approx([0.05 * 0.8 ** ((r.step - 1) // 20) for r in cb.history])
    noise = [row["gns/noise_scale"] for row in logger.rows if "gns/noise_scale" in row]
    assert len(noise) > len(cb.history) // 3 and all(n > 0 for n in noise)


def test_probe_memory_grows_the_micro_batch_to_what_fits_and_b0_splits_into() -> None:
    x, y = regression_data(n=1000)
    cb, logger = AdaptiveBatchSize(probe_memory=True, memory_budget="96KiB", initial_batch_size=64,
                                   policy="fixed", lr_scaling="none"), _Recorder()
    trainer = _fit(Regression(), loader(x, y, batch_size=4), cb, max_epochs=2, logger=logger, log_every_n_steps=1)
    found = cb.probe.max_micro_batch_size
    assert 4 < found < 64  # the budget binds between the DataLoader's 4 and B0
    grown = max(d for d in range(4, min(found, 32) + 1) if 64 % d == 0)
    assert {r.micro_batch_size for r in cb.history[:-1]} == {grown} and {r.batch_size for r in cb.history} == {64}
    assert trainer.train_dataloader.batch_sampler.batch_size == grown
    assert trainer.num_training_batches == math.ceil(1000 / grown)  # Lightning counts the new batches
    assert cb.history[-1].samples == 2 * 1000 and cb.history[-1].epoch == pytest.approx(2.0)  # each example once an epoch
    assert [row["probe/max_micro_batch_size"] for row in logger.rows if "probe/max_micro_batch_size" in row] == [found]


def test_unsupported_setups_are_refused_with_the_fix() -> None:
    x, y = regression_data(n=256)
    weighted = DataLoader(TensorDataset(x, y), batch_size=16,
                          sampler=WeightedRandomSampler(torch.ones(256), num_samples=256))
    with pytest.raises(ValueError, match="WeightedRandomSampler cannot be carried over"):
        _fit(Regression(), weighted, AdaptiveBatchSize(), max_epochs=1)
    with pytest.raises(ValueError, match="must be a multiple of world_size x micro-batch"):
        _fit(Regression(), loader(x, y, batch_size=16), AdaptiveBatchSize(initial_batch_size=40), max_epochs=1)

    class Manual(Regression):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic_optimization=False"):
        _fit(Manual(), loader(x, y), AdaptiveBatchSize(), max_epochs=1)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        _fit(Regression(), loader(x, y), AdaptiveBatchSize(), max_epochs=1, reload_dataloaders_every_n_epochs=1)
    with pytest.raises(ValueError, match="num_workers is not used"):
        _fit(Regression(), loader(x, y), AdaptiveBatchSize(num_workers=2), max_epochs=1)
    with pytest.raises(ValueError, match=r"loggers is not used by the trainer integrations; set the trainer's own "
                                         r"loggers \(Lightning's logger=, the Trainer's report_to\)"):
        _fit(Regression(), loader(x, y), AdaptiveBatchSize(loggers=["jsonl"]), max_epochs=1)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_are_refused_with_the_way_out(strategy: str) -> None:
    # Lightning builds its FSDP strategy only with a GPU: the callback's check sees the
    # strategy the Trainer holds, here a stand-in of that class.
    trainer = types.SimpleNamespace(strategy=type(strategy, (), {})(), callbacks=[], reload_dataloaders_every_n_epochs=0,
                                    limit_train_batches=1.0, overfit_batches=0)
    with pytest.raises(ValueError, match=rf"strategy={strategy}\); it supports one device and DDP.*fully_shard"):
        AdaptiveBatchSize().setup(trainer, Regression(), "fit")


def test_the_default_policys_stability_guard_sees_every_steps_loss() -> None:
    # The budget policy (the default) cuts its LR factor when the smoothed training loss
    # spikes; the callback must feed it each step's loss, as fit does. Reference: the guard's
    # bias-corrected EMA recomputed from the callback's history.
    x, y = regression_data()
    torch.manual_seed(0)
    cb = AdaptiveBatchSize(decide_every=5, max_batch_size=256)
    _fit(Regression(), loader(x, y, batch_size=16), cb, max_epochs=1)
    guard = cb.controller.policy.guard
    losses = [r.train_loss for r in cb.history]
    # each loss reaches the guard as the controller observes its step: the last one included
    assert len(losses) > 50 and guard.smoothed_loss == pytest.approx(smoothed_loss(guard, losses), rel=1e-9)


def test_the_policy_sees_how_far_through_the_trainers_budget_the_run_is() -> None:
    # As in fit: progress = examples seen / (max_epochs x training set), so the budget
    # policy's late anneal can happen inside Lightning too; max_steps alone gives a steps budget.
    x, y = regression_data()
    torch.manual_seed(0)
    cb = AdaptiveBatchSize(decide_every=5, max_batch_size=256)
    _fit(Regression(), loader(x, y, batch_size=16), cb, max_epochs=2)
    ctx = cb.controller.context()
    assert ctx.limited_by == "samples" and ctx.progress == pytest.approx(cb.history[-1].samples / (2 * len(x)))
    assert ctx.progress == pytest.approx(1.0, abs=0.05)
    cb = AdaptiveBatchSize(decide_every=5, max_batch_size=256)
    _fit(Regression(), loader(x, y, batch_size=16), cb, max_steps=10)
    ctx = cb.controller.context()
    assert ctx.limited_by == "steps" and ctx.progress == pytest.approx(1.0)
    assert not ctx.lr_scheduled  # Regression configures no scheduler: the anneal stays available
