"""The MLflow logger, into a SQLite tracking store, read back with MLflow's client."""

from __future__ import annotations

import math

import pytest

mlflow = pytest.importorskip("mlflow")

from autobatch.loggers.mlflow import MLflowLogger  # noqa: E402

pytestmark = pytest.mark.slow  # a new SQLite store is created and migrated: several seconds


def test_steps_reach_the_run_in_batches_under_the_stable_names(tmp_path) -> None:
    logger = MLflowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="autobatch-test")
    logger.log({"train/batch_size": 16, "gns/noise_scale": math.nan}, 1)  # NaN left out
    logger.log({"train/batch_size": 32, "gns/noise_scale": 40.5}, 2)
    client = mlflow.tracking.MlflowClient()
    assert client.get_metric_history(logger.run_id, "train/batch_size") == []  # held until the flush
    logger.close()
    history = client.get_metric_history(logger.run_id, "train/batch_size")
    assert sorted((m.step, m.value) for m in history) == [(1, 16.0), (2, 32.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "gns/noise_scale")] == [(2, 40.5)]
    assert mlflow.active_run() is None  # the run it started is ended
