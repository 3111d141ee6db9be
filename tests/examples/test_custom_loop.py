"""examples/custom_loop.py, the documented lower-level API, runs and learns."""

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_custom_loop_example_runs_and_beats_chance(capsys) -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "custom_loop.py"
    spec = importlib.util.spec_from_file_location("custom_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(epochs=1.0)
    out = capsys.readouterr().out
    accuracy = float(out.rsplit("'val_accuracy': ", 1)[1].rstrip("}\n"))
    assert accuracy > 0.2  # chance is 0.1 on MNIST-1D's ten classes
