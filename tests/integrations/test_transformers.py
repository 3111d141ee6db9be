"""AdaptiveBatchTrainer, the drop-in transformers.Trainer, on a tiny GPT-2 built from a config."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging

from autobatch.integrations.transformers import AdaptiveBatchTrainer
from autobatch.train.sampler import SampleStream
from tests.helpers.guard_reference import smoothed_loss

_spec = importlib.util.spec_from_file_location(
    "hf_trainer_example", Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_example.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

TRAIN, EVAL, VOCAB = example.make_dataset(num_sequences=256)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def _args(tmp_path, **overrides) -> TrainingArguments:
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_train_epochs": 3,
                "learning_rate": 3e-3, "logging_steps": 5, "save_strategy": "no", "report_to": [],
                "use_cpu": True, "disable_tqdm": True, "seed": 0}
    return TrainingArguments(**{**settings, **overrides})


def _trainer(tmp_path, config=None, callbacks=None, **overrides) -> AdaptiveBatchTrainer:
    return AdaptiveBatchTrainer(model=example.tiny_gpt2(VOCAB), args=_args(tmp_path, **overrides),
                                train_dataset=TRAIN, eval_dataset=EVAL, data_collator=example.collate,
                                callbacks=callbacks, autobatch_config={"decide_every": 5, "policy": "gns", **(config or {})})


def test_b_grows_the_loss_falls_and_the_log_history_carries_both(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    out = trainer.train()
    history = trainer.history
    assert history[0].batch_size == 4 and max(r.batch_size for r in history) >= 16
    first = sum(r.train_loss for r in history[:5]) / 5
    last = sum(r.train_loss for r in history[-5:]) / 5
    assert last < first - 1.0  # 4.2 nats (uniform over ~90 characters) down to about 2.5
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert logs and all("batch_size" in row for row in logs)
    assert any(row.get("noise_scale", 0) > 0 for row in logs)
    assert {row["batch_size"] for row in logs} == {r.batch_size for r in history if r.step % 5 == 0}
    # The Trainer's own figures count examples: 3 epochs, 3 x 256 examples.
    assert trainer.state.epoch == pytest.approx(3.0)
    assert history[-1].samples == 3 * 256
    assert out.metrics["train_samples_per_second"] == pytest.approx(
        3 * 256 / out.metrics["train_runtime"], rel=0.01)
    # An epoch-based schedule ends with the epochs: the linear decay reached its end.
    assert trainer.lr_scheduler.get_last_lr()[0] < 0.05 * 3e-3


class _FirstStepGradient(TrainerCallback):
    def __init__(self) -> None:
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_accumulated_gradient_is_the_big_batchs_token_mean_gradient(tmp_path) -> None:
    # B0 = 8 padded, length-varying sequences in micro-batches of 3, 3 and 2.
    probe = _FirstStepGradient()
    trainer = _trainer(tmp_path, config={"max_micro_batch_size": 3}, callbacks=[probe], max_steps=1,
                       max_grad_norm=0.0, per_device_train_batch_size=8)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.history[0].accum_steps == 3
    indices = SampleStream(len(TRAIN), seed=0).take(8).tolist()
    reference = example.tiny_gpt2(VOCAB)
    reference.load_state_dict(initial)
    batch = example.collate([TRAIN[i] for i in indices])
    reference(**batch).loss.backward()  # one backward: the token mean over all 8 sequences
    lengths = {len(TRAIN[i]["input_ids"]) for i in indices}
    assert len(lengths) > 3  # really length-varying
    naive = 0.0
    for name, p in reference.named_parameters():
        got, want = probe.grads[name], p.grad
        assert torch.linalg.vector_norm(got - want) <= 1e-5 * torch.linalg.vector_norm(want), name
    # What a mean over micro-batch means would give instead: measurably different.
    reference.zero_grad()
    for chunk in (indices[:3], indices[3:6], indices[6:]):
        (reference(**example.collate([TRAIN[i] for i in chunk])).loss * len(chunk) / 8).backward()
    naive = max(float(torch.linalg.vector_norm(probe.grads[n] - p.grad) / torch.linalg.vector_norm(p.grad))
                for n, p in reference.named_parameters())
    assert naive > 1e-3


def test_resuming_from_a_checkpoint_keeps_b_and_continues_the_same_run(tmp_path) -> None:
    full = _trainer(tmp_path / "full")
    full.train()
    changed = next(r.step for r in full.history if r.batch_size != full.history[0].batch_size)
    save_at = changed + 5  # B had grown by then
    part = _trainer(tmp_path / "part", save_strategy="steps", save_steps=save_at)
    part.train()
    resumed = _trainer(tmp_path / "part")
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / f"checkpoint-{save_at}"))
    assert resumed.history[save_at].batch_size == full.history[save_at].batch_size != full.history[0].batch_size
    assert [r.batch_size for r in resumed.history] == [r.batch_size for r in full.history]
    for a, b in zip(resumed.history, full.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
    assert resumed.state.global_step == full.state.global_step


def test_hyperparameter_search_with_optuna_runs_trials_with_their_own_b0(tmp_path) -> None:
    pytest.importorskip("optuna")
    # B0 = per_device_train_batch_size x gradient_accumulation_steps, searched per trial.
    trainer = AdaptiveBatchTrainer(
        model_init=lambda trial=None: example.tiny_gpt2(VOCAB),
        args=_args(tmp_path, num_train_epochs=1, gradient_accumulation_steps=2),
        train_dataset=TRAIN, eval_dataset=EVAL, data_collator=example.collate,
        autobatch_config={"decide_every": 5},
    )
    seen = []

    class Record(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            seen.append((args.per_device_train_batch_size, trainer.history[0].batch_size,
                         args.gradient_accumulation_steps))

    trainer.add_callback(Record())

    def space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True),
                "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8])}

    best = trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=2, direction="minimize")
    assert len(seen) == 2 and all(b0 == 2 * per_device for per_device, b0, _ in seen)
    assert all(accumulation == 1 for *_, accumulation in seen)  # the Trainer's loop sees whole steps
    assert math.isfinite(best.objective)
    assert trainer.args.gradient_accumulation_steps == 2  # the user's setting, put back


def test_the_default_policys_stability_guard_sees_every_steps_loss(tmp_path) -> None:
    # As in fit: each step's loss reaches the budget policy's guard (its bias-corrected EMA,
    # recomputed here from the trainer's history).
    trainer = _trainer(tmp_path, config={"policy": "budget"}, num_train_epochs=1)
    trainer.train()
    guard = trainer.batch_controller.policy.guard
    losses = [r.train_loss for r in trainer.history]
    # each loss reaches the guard as the controller observes its step: the last one included
    assert len(losses) > 20 and guard.smoothed_loss == pytest.approx(smoothed_loss(guard, losses), rel=1e-9)


def test_the_policy_sees_how_far_through_the_trainers_budget_the_run_is(tmp_path) -> None:
    # progress = examples seen / (num_train_epochs x training set), as fit computes it; with
    # max_steps > 0 (which overrides the epochs in the Trainer) a steps budget.
    trainer = _trainer(tmp_path, config={"policy": "budget"}, num_train_epochs=1)
    trainer.train()
    ctx = trainer.batch_controller.context()
    assert ctx.limited_by == "samples" and ctx.progress == pytest.approx(trainer.history[-1].samples / len(TRAIN))
    assert ctx.progress == pytest.approx(1.0)
    assert ctx.lr_scheduled  # the Trainer's default linear decay: the policy leaves the decay to it
    trainer = _trainer(tmp_path, max_steps=6, lr_scheduler_type="constant")
    trainer.train()
    ctx = trainer.batch_controller.context()
    assert ctx.limited_by == "steps" and ctx.progress == pytest.approx(1.0) and not ctx.lr_scheduled


def test_report_to_tensorboard_gets_fits_names_with_the_trainers_train_prefix(tmp_path, monkeypatch) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = _trainer(tmp_path, report_to=["tensorboard"], logging_steps=2, num_train_epochs=1)
    trainer.train()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    names = set(events.Tags()["scalars"])
    # The Trainer's TensorBoard writer puts train/ in front of every training-time name
    # (transformers' rewrite_logs): fit's train/* names come out as they are, gns/* under train/.
    assert {"train/batch_size", "train/micro_batch_size", "train/lr", "train/loss", "train/examples", "train/tokens",
            "train/gns/noise_scale", "train/gns/noise_scale_stderr", "train/gns/grad_sq", "train/gns/trace_sigma",
            "train/noise_scale", "train/lr_factor"} <= names
    by_step = {r.step: r for r in trainer.history}
    logged = events.Scalars("train/batch_size")
    assert [e.step for e in logged] == [r.step for r in trainer.history if r.step % 2 == 0]
    assert all(e.value == by_step[e.step].batch_size for e in logged)
    assert all(e.value == pytest.approx(by_step[e.step].lr, rel=1e-6) for e in events.Scalars("train/lr"))
    assert all(e.value == by_step[e.step].samples for e in events.Scalars("train/examples"))
    # tokens: the loss tokens of every step so far (shifted labels != -100), for one epoch all of them
    tokens = sum(len(item["input_ids"]) - 1 for item in TRAIN)
    assert trainer.history[-1].loss_items == tokens
    assert all(e.value == by_step[e.step].loss_items for e in events.Scalars("train/tokens"))


class _ScheduledLR(TrainerCallback):
    """The LR the schedule set for each step, read just before the optimizer step (before the
    batch factor is applied around it)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_the_history_records_the_base_lr_the_schedule_set(tmp_path) -> None:
    seen = _ScheduledLR()
    trainer = _trainer(tmp_path, callbacks=[seen], num_train_epochs=1)
    trainer.train()
    assert [r.base_lr for r in trainer.history] == pytest.approx(seen.lrs, rel=1e-12)
    assert trainer.history[0].base_lr == pytest.approx(3e-3) and trainer.history[-1].base_lr < 1e-3  # linear decay


def test_measure_mode_keeps_the_trainers_batch_and_lr_and_logs_the_noise_scale(tmp_path) -> None:
    trainer = _trainer(tmp_path, config={"policy": "measure"}, num_train_epochs=1)
    trainer.train()
    assert {r.batch_size for r in trainer.history} == {4}  # per_device_train_batch_size x accumulation 1
    assert all(r.lr == pytest.approx(r.base_lr) for r in trainer.history)  # the schedule's LR, unscaled
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert logs and all(row["batch_size"] == 4 for row in logs)
    assert any(row.get("gns/noise_scale", 0) > 0 for row in logs)


def test_probe_memory_sets_the_micro_batch_cap_to_the_probes_answer(tmp_path) -> None:
    config = {"probe_memory": True, "memory_budget": "4MiB", "initial_batch_size": 32, "policy": "fixed",
              "lr_scaling": "none"}
    trainer = _trainer(tmp_path, config=config, num_train_epochs=1)
    trainer.train()
    found = trainer.probe.max_micro_batch_size
    assert 4 < found < 16  # the budget binds above per_device_train_batch_size (4) and below B0 / 2
    assert trainer.batch_controller.max_micro_batch_size == found
    assert max(r.micro_batch_size for r in trainer.history) == found > 4
    assert [row["probe/max_micro_batch_size"] for row in trainer.state.log_history if "probe/budget_bytes" in row] == [
        found]


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_the_trainers_sharding_engines_are_refused_with_the_way_out(tmp_path, engine: str) -> None:
    trainer = _trainer(tmp_path)
    setattr(trainer, f"is_{engine}_enabled", True)  # as the Trainer sets it from its FSDP / DeepSpeed arguments
    with pytest.raises(ValueError, match=rf"Trainer's {'FSDP' if engine == 'fsdp' else 'DeepSpeed'} engine does not "
                                         r"let it do .* supports DDP .*fully_shard and train it with autobatch.fit"):
        trainer.get_train_dataloader()
