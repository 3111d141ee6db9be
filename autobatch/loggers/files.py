"""Loggers that write plain files, with nothing to install: JSON lines and CSV.

Both write every step (a few microseconds each: ``max_overhead=None``), buffered, and reach
the disk at every :meth:`~autobatch.loggers.base.Logger.flush` (every couple of seconds of a
run), so ``tail -f`` and a reader in another process see the run as it goes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from autobatch.loggers.base import Logger, finite_or_none

__all__ = ["CSVLogger", "JSONLLogger"]


def _target(log_dir: str | Path | None, path: str | Path | None, name: str) -> Path:
    if path is None and log_dir is None:
        raise ValueError(f"give the logger a path or a log_dir (got neither); e.g. log_dir='autobatch_logs' writes "
                         f"autobatch_logs/{name}")
    target = Path(path) if path is not None else Path(log_dir) / name  # type: ignore[arg-type]
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


class JSONLLogger(Logger):
    """One JSON object per line: ``{"step": 12, "train/batch_size": 32, ...}``; NaN and
    infinities are written as ``null``. Read it back with ``pandas.read_json(path, lines=True)``.

    Args:
        log_dir: folder of ``metrics.jsonl`` (created).
        path: the file itself, instead of ``log_dir``.
        append: add to an existing file (``fit`` appends when it resumes) instead of starting
            it anew.
    """

    max_overhead = None

    def __init__(self, log_dir: str | Path | None = None, *, path: str | Path | None = None,
                 append: bool = False) -> None:
        self.path = _target(log_dir, path, "metrics.jsonl")
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        line = json.dumps({"step": step, **metrics})
        if "NaN" in line or "Infinity" in line:  # rare once the estimate is ready: JSON has neither
            line = json.dumps({"step": step, **{k: finite_or_none(v) for k, v in metrics.items()}})
        self._file.write(line + "\n")

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class CSVLogger(Logger):
    """A table, one row per logged step and one column per name (``step`` first), empty where
    a step has no value (``val/*`` outside evaluations, NaN). A name first seen late (the first
    evaluation's) widens the table: the file is rewritten once with the new header.

    Args:
        log_dir: folder of ``metrics.csv`` (created).
        path: the file itself, instead of ``log_dir``.
        append: add to an existing file (its header is kept and widened as needed).
    """

    max_overhead = None

    def __init__(self, log_dir: str | Path | None = None, *, path: str | Path | None = None,
                 append: bool = False) -> None:
        self.path = _target(log_dir, path, "metrics.csv")
        self._columns: list[str] = ["step"]
        if append and self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="", encoding="utf-8") as fh:
                self._columns = next(csv.reader(fh), ["step"])
        else:
            self.path.write_text(",".join(self._columns) + "\n", encoding="utf-8")
        self._rows: list[dict[str, object]] = []

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._rows.append({"step": step, **metrics})

    def flush(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        new = [k for row in rows for k in row if k not in self._columns]
        if new:  # rare (the first evaluation): rewrite the file under the wider header
            with self.path.open(newline="", encoding="utf-8") as fh:
                old = list(csv.DictReader(fh))
            self._columns += list(dict.fromkeys(new))
            rows = old + rows
            mode = "w"
        else:
            mode = "a"
        with self.path.open(mode, newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._columns, restval="")
            if mode == "w":
                writer.writeheader()
            writer.writerows({k: ("" if finite_or_none(v) is None else v) for k, v in row.items()} for row in rows)
