"""MLflow (``pip install "torch-autobatch[mlflow]"``, MLflow's light client ``mlflow-skinny``):
the run's figures as the metrics of an MLflow run, sent in batches."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autobatch.loggers.base import Logger

__all__ = ["MLflowLogger"]

_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MLflowLogger(Logger):
    """Logs into the active MLflow run, or one it starts (and ends at the end of the run).

    Metrics are held and sent with ``MlflowClient.log_batch`` at every flush (every couple of
    seconds of the run): one request per batch instead of one per value. Where to is MLflow's
    own setting (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``), or ``tracking_uri``.
    NaN values (the noise scale before its estimate is ready) are left out.

    Args:
        log_dir: unused (MLflow's tracking URI says where runs go); accepted so that every
            named logger is built alike.
        append: unused, likewise.
        tracking_uri: where to log, e.g. ``"sqlite:///mlflow.db"``; None: MLflow's current one.
        experiment: the experiment's name (created if needed); None: MLflow's current one.
        run_name: the name of the run it starts.

    Raises:
        ImportError: without MLflow, naming the extra that installs it.
    """

    def __init__(self, log_dir: str | Path | None = None, *, append: bool = False, tracking_uri: str | None = None,
                 experiment: str | None = None, run_name: str | None = None) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric
        except ImportError as err:
            raise ImportError('the mlflow logger needs MLflow: pip install "torch-autobatch[mlflow]" '
                              "(or pip install mlflow-skinny)") from err
        if tracking_uri is not None:
            mlflow.set_tracking_uri(tracking_uri)
        if experiment is not None:
            mlflow.set_experiment(experiment)
        active = mlflow.active_run()
        self._owns = active is None
        self.run_id = (active or mlflow.start_run(run_name=run_name)).info.run_id
        self._mlflow, self._metric = mlflow, Metric
        self._client = mlflow.tracking.MlflowClient()
        self._held: list[Any] = []

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metric = self._metric
        self._held.extend(metric(k, float(v), now, step) for k, v in metrics.items() if v == v)

    def flush(self) -> None:
        held, self._held = self._held, []
        for i in range(0, len(held), _BATCH):
            self._client.log_batch(self.run_id, metrics=held[i : i + _BATCH])

    def close(self) -> None:
        self.flush()
        if self._owns:
            self._mlflow.end_run()
