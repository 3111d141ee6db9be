"""The TensorBoard logger: one event per step, read back with TensorBoard's own reader."""

from __future__ import annotations

import builtins
import math

import pytest

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from autobatch.loggers.tensorboard import TensorBoardLogger  # noqa: E402


def test_every_name_of_a_step_is_a_scalar_at_that_step(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path)
    logger.log({"train/batch_size": 16, "gns/noise_scale": math.nan}, 1)
    logger.log({"train/batch_size": 32, "gns/noise_scale": 40.5}, 2)
    logger.close()
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/batch_size")] == [(1, 16.0), (2, 32.0)]
    values = [e.value for e in events.Scalars("gns/noise_scale")]
    assert math.isnan(values[0]) and values[1] == 40.5


def test_without_tensorboard_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("tensorboard", "torch.utils.tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r'pip install "torch-autobatch\[tensorboard\]"'):
        TensorBoardLogger("unused")
