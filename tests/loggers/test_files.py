"""The file loggers: JSON lines and CSV, read back as another program would."""

from __future__ import annotations

import csv
import json
import math

import pytest

from autobatch.loggers import CSVLogger, JSONLLogger
from autobatch.registry import create


def test_jsonl_writes_standard_json_with_null_for_nan(tmp_path) -> None:
    logger = JSONLLogger(tmp_path)
    logger.log({"train/loss": 0.5, "gns/noise_scale": math.nan, "gns/noise_scale_stderr": math.inf}, 1)
    logger.flush()  # readable now, while the run goes on
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "step": 1, "train/loss": 0.5, "gns/noise_scale": None, "gns/noise_scale_stderr": None}
    logger.log({"train/loss": 0.25}, 2)
    logger.close()
    again = JSONLLogger(path=tmp_path / "metrics.jsonl", append=True)
    again.log({"train/loss": 0.125}, 3)
    again.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_csv_widens_its_header_when_a_name_first_appears_late(tmp_path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log({"train/loss": 0.5, "gns/noise_scale": math.nan}, 1)
    logger.flush()
    logger.log({"val/loss": 0.75}, 1)
    logger.log({"train/loss": 0.25, "gns/noise_scale": 12.0}, 2)
    logger.close()
    with (tmp_path / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "train/loss", "gns/noise_scale", "val/loss"]
    assert rows == [
        {"step": "1", "train/loss": "0.5", "gns/noise_scale": "", "val/loss": ""},
        {"step": "1", "train/loss": "", "gns/noise_scale": "", "val/loss": "0.75"},
        {"step": "2", "train/loss": "0.25", "gns/noise_scale": "12.0", "val/loss": ""},
    ]
    again = CSVLogger(tmp_path, append=True)  # a resumed run keeps the header and the rows
    again.log({"train/loss": 0.125}, 3)
    again.close()
    with (tmp_path / "metrics.csv").open(newline="") as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["1", "1", "2", "3"]


def test_named_loggers_are_built_from_the_registry_and_a_typo_is_named(tmp_path) -> None:
    assert isinstance(create("logger", "jsonl", log_dir=tmp_path, append=False), JSONLLogger)
    with pytest.raises(ValueError, match=r"unknown logger 'jsnol'; allowed: csv, jsonl, mlflow, tensorboard, wandb.*"
                                         r"did you mean 'jsonl'\?"):
        create("logger", "jsnol")
    with pytest.raises(ValueError, match="give the logger a path or a log_dir"):
        JSONLLogger()
