"""examples/lightning_example.py, the Lightning callback on an unchanged module, runs and learns."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

pytest.importorskip("lightning")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    # Lightning's tips about workers, loggers and resumable loaders are not under test.
    warnings.filterwarnings("ignore", module="lightning")


def test_the_example_script_runs_and_learns(capsys) -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "lightning_example.py"
    spec = importlib.util.spec_from_file_location("lightning_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    adaptive = module.main(epochs=2)
    out = capsys.readouterr().out
    assert "steps; B (step, size)" in out
    assert float(out.rsplit("val_accuracy ", 1)[1]) > 0.3  # chance is 0.1 on MNIST-1D's ten classes
    assert len({r.batch_size for r in adaptive.history}) > 1
