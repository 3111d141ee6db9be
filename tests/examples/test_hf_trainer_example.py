"""examples/hf_trainer_example.py, AdaptiveBatchTrainer on a tiny GPT-2, runs and learns."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers.utils import logging

_spec = importlib.util.spec_from_file_location(
    "hf_trainer_example", Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_example.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def test_the_example_script_runs_and_learns(capsys) -> None:
    trainer = example.main(epochs=2.0)
    assert trainer.history[-1].train_loss < trainer.history[0].train_loss - 1.0
    assert "steps; B (step, size)" in capsys.readouterr().out
