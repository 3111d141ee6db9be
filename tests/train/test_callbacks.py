"""The callbacks of fit: LogMetrics sends each step, each evaluation and the probe's answer to
the loggers under the stable names, read back here from the files they wrote."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch
from torch import nn

import autobatch
from autobatch.loggers import STEP_KEYS, Logger
from autobatch.testing import padded_lm
from autobatch.train.callbacks import LogMetrics
from autobatch.train.results import StepRecord

TRAIN_KEYS = {k for k in STEP_KEYS if k != "train/tokens"}


class Recorder(Logger):
    """A logger of one's own: one method."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log(self, metrics, step) -> None:
        self.rows.append((step, dict(metrics)))


def _fit(classification, tmp_path, **kwargs):
    x, y = classification(512, 8, 4)
    xv, yv = classification(128, 8, 4)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    settings = {"loss_fn": nn.functional.cross_entropy, "val_data": (xv, yv), "lr": 0.1, "epochs": 2,
                "initial_batch_size": 16, "decide_every": 5, "log_dir": tmp_path, **kwargs}
    return autobatch.fit(model, (x, y), **settings)


def test_jsonl_and_csv_hold_every_step_and_evaluation_under_the_stable_names(classification, tmp_path) -> None:
    result = _fit(classification, tmp_path, loggers=["jsonl", "csv"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/batch_size" in r]
    assert [r["step"] for r in steps] == [rec.step for rec in result.history]
    assert set(steps[0]) == {"step"} | TRAIN_KEYS  # the loss items are the examples: no train/tokens
    for row, rec in zip(steps, result.history):
        assert row["train/batch_size"] == rec.batch_size and row["train/examples"] == rec.samples
        assert row["train/lr"] == rec.lr and row["train/loss"] == pytest.approx(rec.train_loss)
        assert row["gns/trace_sigma"] == pytest.approx(rec.trace_cov) and row["gns/grad_sq"] == pytest.approx(rec.grad_sq)
        # JSON has no NaN: the noise scale is null until the estimate is ready
        assert row["gns/noise_scale"] == (None if math.isnan(rec.noise_scale) else pytest.approx(rec.noise_scale))
    evals = [r for r in rows if "val/loss" in r]
    assert [(r["step"], r["val/loss"], r["val/accuracy"]) for r in evals] == [
        (e["step"], pytest.approx(e["val_loss"]), pytest.approx(e["val_accuracy"])) for e in result.evals]
    with (tmp_path / "metrics.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["step", *[k for k in STEP_KEYS if k != "train/tokens"], "val/loss", "val/accuracy"]
    assert [int(r["step"]) for r in table if r["train/batch_size"]] == [rec.step for rec in result.history]
    assert [float(r["val/loss"]) for r in table if r["val/loss"]] == pytest.approx([e["val_loss"] for e in result.evals])


def test_tensorboard_event_files_hold_the_stable_names(classification, tmp_path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = _fit(classification, tmp_path, loggers="tensorboard")
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == TRAIN_KEYS | {"val/loss", "val/accuracy"}
    by_step = {rec.step: rec for rec in result.history}
    logged = events.Scalars("train/batch_size")
    # written within 1% of the run's time: every step or every so many, the last one always
    assert logged[-1].step == result.steps and len(logged) >= 2
    for event in logged:
        assert event.value == by_step[event.step].batch_size
    for event in events.Scalars("gns/trace_sigma"):
        assert event.value == pytest.approx(by_step[event.step].trace_cov, rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [e["step"] for e in result.evals]


def test_a_users_logger_is_one_method_and_sees_the_probes_answer_once(classification, tmp_path) -> None:
    recorder = Recorder()
    result = _fit(classification, tmp_path, loggers=[recorder], memory_budget="64MiB")
    step0 = [m for s, m in recorder.rows if s == 0]
    assert len(step0) == 1 and step0[0]["probe/max_micro_batch_size"] >= 1
    assert step0[0]["probe/budget_bytes"] == 64 * 2**20
    assert [s for s, m in recorder.rows if "train/loss" in m] == [rec.step for rec in result.history]


def test_token_data_logs_the_tokens_seen(tmp_path) -> None:
    case = padded_lm(n=64)
    recorder = Recorder()
    result = autobatch.fit(case.model, case.data, loss_fn=case.loss_fn, loss_items="tokens", lr=0.01, epochs=1,
                           optimizer=torch.optim.AdamW, initial_batch_size=8, policy="fixed", lr_scaling="none",
                           loggers=[recorder])
    tokens = sum(int((y != -100).sum()) for _, y in case.data.dataset)
    assert result.history[-1].loss_items == tokens  # one epoch: every target once
    logged = [m["train/tokens"] for _, m in recorder.rows if "train/tokens" in m]
    assert logged == [rec.loss_items for rec in result.history] and logged[-1] == tokens


def test_no_logger_means_no_callback_and_no_file(classification, tmp_path) -> None:
    _fit(classification, tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_a_resumed_run_appends_to_its_files(classification, tmp_path) -> None:
    first = _fit(classification, tmp_path, loggers=["jsonl"], checkpoint_dir=tmp_path / "ckpt", epochs=1)
    second = _fit(classification, tmp_path, loggers=["jsonl"], checkpoint_dir=tmp_path / "ckpt", resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, first.steps + 1)) + list(range(first.steps + 1, second.steps + 1))


def _records(n: int, step_s: float) -> list[StepRecord]:
    return [StepRecord(step=i, epoch=0.0, samples=16 * i, batch_size=16, examples=16, micro_batch_size=16,
                       accum_steps=1, lr=0.1, train_loss=1.0, grad_sq=1.0, trace_cov=1.0, noise_scale=1.0,
                       wall_time_s=i * step_s) for i in range(1, n + 1)]


class Slow(Recorder):
    """A logger whose writes cost 2 ms each."""

    max_overhead = 0.01

    def log(self, metrics, step) -> None:
        time.sleep(0.002)
        super().log(metrics, step)


def test_a_slow_logger_is_held_to_its_share_of_the_run_and_writes_the_last_step() -> None:
    records = _records(1000, step_s=0.01)  # 10 s of 10 ms steps; 1% is 0.1 s: about 50 writes of 2 ms
    slow, quick = Slow(), Recorder()
    quick.max_overhead = None
    callback = LogMetrics([slow, quick], every_s=1.0)
    for rec in records:
        callback.on_step_end(rec)
    callback.on_eval(1000, 16_000, {"val_loss": 0.5})
    callback.on_fit_end(None)
    assert [s for s, _ in quick.rows] == [*range(1, 1001), 1000]  # every step, then the evaluation
    written = [s for s, m in slow.rows if "train/loss" in m]
    assert 10 <= len(written) <= 120 and written[-1] == 1000
    assert slow.rows[-1] == (1000, {"val/loss": 0.5})  # evaluations always
