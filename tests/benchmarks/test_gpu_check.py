"""benchmarks/gpu_check.py: without CUDA it says so and skips every row (exit 0); its checks'
code runs on CPU in smoke mode (fp32 for fp16, gloo for nccl), so the script stays runnable
for the day a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

SCRIPT = Path(gpu_check.__file__)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the no-GPU path, even on a GPU machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_without_cuda_every_check_is_skipped_and_the_exit_status_is_0(tmp_path) -> None:
    out = _run("--out", str(tmp_path / "gpu_check.json"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "gpu_check needs a CUDA GPU (torch.cuda.is_available() is False here): every check skipped"
    assert lines[1].split() == ["check", "status", "seconds", "detail"]
    rows = [line.split(None, 1) for line in lines[2:2 + len(gpu_check.CHECKS)]]
    assert [name for name, _ in rows] == list(gpu_check.CHECKS)
    assert all(rest.startswith("skipped (no CUDA)") for _, rest in rows)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is True and report["device"] is None
    assert [(r["check"], r["status"]) for r in report["rows"]] == [(n, "skipped (no CUDA)") for n in gpu_check.CHECKS]


def test_without_cuda_and_without_out_nothing_is_written(tmp_path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path, check=False,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert out.returncode == 0 and "results:" not in out.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # six short fits and a one-process gloo group, ~30 s on 2 busy cores
def test_the_checks_code_runs_on_cpu_in_smoke_mode(tmp_path) -> None:
    out = _run("--smoke-cpu", "--out", str(tmp_path / "smoke.json"))
    report = json.loads((tmp_path / "smoke.json").read_text())
    failed = [r for r in report["rows"] if r["status"] != "pass"]
    assert out.returncode == 0 and not failed, (failed, out.stderr[-3000:])
    details = {r["check"]: r["detail"] for r in report["rows"]}
    assert "weights unchanged at [3, 7]" in details["fp16_inf_skip"]
    assert "max weight difference 0" in details["checkpoint_resume"]
    assert "backend gloo, world_size 1" in details["nccl_one_process"]
