"""benchmarks/gpu_check.py: without CUDA it says so and reports every row as skipped (exit 0,
and no claim that anything passed); skips are counted apart from passes, a failed check exits
1; its checks' code runs on CPU in smoke mode (fp32 for fp16, gloo for nccl), so the script
stays runnable for the day a GPU is at hand."""

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
    assert all(rest.split() == ["skipped", "0.0", "no", "CUDA"] for _, rest in rows)
    assert lines[2 + len(gpu_check.CHECKS)] == f"nothing checked: all {len(gpu_check.CHECKS)} checks skipped"
    assert "passed" not in out.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] is None
    assert report["tally"] == {"passed": 0, "skipped": len(gpu_check.CHECKS), "failed": 0}
    assert [(r["check"], r["status"]) for r in report["rows"]] == [(n, "skipped") for n in gpu_check.CHECKS]


def test_without_cuda_and_without_out_nothing_is_written(tmp_path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path, check=False,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert out.returncode == 0 and "results:" not in out.stdout
    assert not list(tmp_path.iterdir())


def _check(kind: str):
    """A stand-in check that passes, fails, skips itself or raises."""
    def check(device):
        if kind == "skip":
            raise gpu_check.SkipCheck("not on this device")
        if kind == "error":
            raise RuntimeError("broken\nsecond line")
        return kind == "pass", kind
    return check


@pytest.mark.parametrize(("kinds", "status", "tally", "verdict"), [
    (["pass", "pass"], 0, {"passed": 2, "skipped": 0, "failed": 0}, "all 2 checks passed"),
    (["pass", "skip"], 0, {"passed": 1, "skipped": 1, "failed": 0}, "1 of 2 checks passed, 1 skipped, none failed"),
    (["pass", "skip", "fail"], 1, {"passed": 1, "skipped": 1, "failed": 1}, "1 of 3 checks FAILED (1 passed, 1 skipped)"),
    (["skip", "error"], 1, {"passed": 0, "skipped": 1, "failed": 1}, "1 of 2 checks FAILED (0 passed, 1 skipped)"),
], ids=["all_pass", "a_skip", "a_failure", "an_error"])
def test_skips_are_counted_apart_from_passes_and_a_failed_check_exits_1(
        kinds, status, tally, verdict, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_check, "CHECKS", {f"check{i}": _check(kind) for i, kind in enumerate(kinds)})
    assert gpu_check.main(["--smoke-cpu", "--out", str(tmp_path / "r.json")]) == status  # the exit status
    lines = capsys.readouterr().out.splitlines()
    assert verdict in lines
    assert any(line.startswith("all ") for line in lines) == (kinds == ["pass"] * len(kinds))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tally"] == tally
    expected = {"pass": ("pass", "pass"), "fail": ("FAIL", "fail"), "skip": ("skipped", "not on this device"),
                "error": ("FAIL", "RuntimeError: broken")}
    assert [(r["status"], r["detail"]) for r in report["rows"]] == [expected[kind] for kind in kinds]


@pytest.mark.slow  # six short fits and a one-process gloo group, ~30 s on 2 busy cores
def test_the_checks_code_runs_on_cpu_in_smoke_mode(tmp_path) -> None:
    out = _run("--smoke-cpu", "--out", str(tmp_path / "smoke.json"))
    report = json.loads((tmp_path / "smoke.json").read_text())
    statuses = {r["check"]: r["status"] for r in report["rows"]}
    # the real-OOM check needs a device limit: on CPU it is skipped, and said to be
    assert statuses.pop("probe_real_oom") == "skipped", report["rows"]
    failed = {name: status for name, status in statuses.items() if status != "pass"}
    assert out.returncode == 0 and not failed, (failed, out.stderr[-3000:])
    checks = len(gpu_check.CHECKS)
    assert report["tally"] == {"passed": checks - 1, "skipped": 1, "failed": 0}
    assert f"{checks - 1} of {checks} checks passed, 1 skipped, none failed" in out.stdout.splitlines()
    details = {r["check"]: r["detail"] for r in report["rows"]}
    assert details["probe_real_oom"] == "on CPU (the device limit is what this exercises)"
    assert "weights unchanged at [3, 7]" in details["fp16_inf_skip"]
    assert "max weight difference 0" in details["checkpoint_resume"]
    assert "backend gloo, world_size 1" in details["nccl_one_process"]
