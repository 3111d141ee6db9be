"""benchmarks/gpu_lm.py: its --smoke-cpu mode runs the GPU benchmark's code on CPU in seconds and
writes every arm with finite figures; without CUDA and without the smoke mode it says so and
writes nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_lm

ROOT = Path(gpu_lm.__file__).resolve().parents[1]


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


@pytest.mark.slow  # five tiny fits and the memory probe, ~6 s on 2 busy cores
def test_smoke_mode_writes_every_arm_with_finite_figures(tmp_path) -> None:
    out = tmp_path / "gpu_lm.json"
    assert gpu_lm.main(["--smoke-cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu (smoke)" and report["skipped"] == []
    for key in ("precision", "task", "b0", "lrs", "tuned_lr", "probe", "runs", "summary", "total_s"):
        assert key in report
    big = report["probe"]["batch_size"]
    names = {f"fixed lr={lr:g}" for lr in gpu_lm.SMOKE.lrs} | {"default", f"probe-max B={big}", "schedule"}
    assert set(report["runs"]) == names == set(report["summary"]["arms"])
    assert big % 8 == 0 and big > gpu_lm.SMOKE.b0
    s = report["summary"]
    assert s["best_fixed"].startswith("fixed") and s["arms"][s["best_fixed"]]["ratios"] == {
        "step": 1.0, "tokens": 1.0, "wall_s": 1.0}
    probe_run = report["runs"][f"probe-max B={big}"]
    assert probe_run["lr"] == report["tuned_lr"] * math.sqrt(big / gpu_lm.SMOKE.b0)  # the square-root rule
    for row in report["runs"].values():
        assert row["final_loss"] is not None and row["curve"][-1]["step"] == row["steps"]
    assert all(math.isfinite(x) for x in _numbers(report))


def test_without_cuda_it_says_so_and_writes_nothing(tmp_path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_lm", "--out", str(tmp_path / "x.json")], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0 and "needs a CUDA GPU" in done.stdout
    assert not (tmp_path / "x.json").exists()
