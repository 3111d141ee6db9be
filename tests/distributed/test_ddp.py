"""Data-parallel training: two gloo processes on CPU launched by torchrun (tests/helpers/ddp_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch build without gloo"),
    pytest.mark.slow,
    pytest.mark.distributed,
]

WORKER = str(Path(__file__).resolve().parents[1] / "helpers" / "ddp_worker.py")


def _run(out: Path, *args: str, ranks: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", WORKER, str(out), *args]
    else:
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        cmd = [sys.executable, WORKER, str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_two_ranks_train_like_one_process_with_the_whole_batch(tmp_path) -> None:
    # Estimator off, fixed B=64: the summed all-reduce of two ranks' b/B-weighted gradients is
    # the gradient of the whole batch, so the weights match one process (up to rounding).
    args = ("--max-steps", "20", "--policy", "fixed", "--batch", "64", "--gns-method", "off",
            "--lr-scaling", "none")
    r0, r1 = _run(tmp_path / "ddp", *args, ranks=2)
    (single,) = _run(tmp_path / "single", *args, ranks=1)
    assert r0["weights"] == r1["weights"]
    import torch

    for a, b in zip(r0["weights"], single["weights"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6)
    assert r0["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)


def test_two_ranks_take_the_same_decisions_and_end_with_the_same_weights(tmp_path) -> None:
    # goodput decides from measured step times, which differ between the ranks: rank 0's
    # decision must be the one every rank follows.
    r0, r1 = _run(tmp_path, "--max-steps", "40", "--lr", "0.05", "--policy", "goodput", ranks=2)
    assert r0["world_size"] == 2
    assert r0["batch_sizes"] == r1["batch_sizes"]
    assert len(set(r0["batch_sizes"])) > 1  # the policy did move B during the run
    assert r0["weights"] == r1["weights"]


def test_two_rank_noise_estimate_matches_the_single_process_micro_batch_estimate(tmp_path) -> None:
    # Parameters barely move (lr 1e-9), B=64: two ranks of 32 vs one process with two
    # micro-batches of 32 (a micro-batch cap of 32, so every step is measured there too)
    # measure the same small batches in the same order.
    args = ("--max-steps", "30", "--lr", "1e-9", "--policy", "fixed", "--batch", "64", "--smoothing", "0.9")
    (ddp,) = _run(tmp_path / "ddp", *args, ranks=2)[:1]
    (single,) = _run(tmp_path / "single", *args, "--max-micro", "32", ranks=1)
    assert single["micro"] == [32] * 30 and ddp["micro"] == [32] * 30
    err = abs(ddp["noise_scale"] - single["noise_scale"])
    assert err <= 2 * single["noise_scale_stderr"], (ddp["noise_scale"], single["noise_scale"], single["noise_scale_stderr"])
    assert err <= 1e-3 * single["noise_scale"]  # in fact the same computation, up to rounding


def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    first = _run(tmp_path / "a", "--max-steps", "12", "--checkpoint", ckpt, ranks=2)[0]
    resumed = _run(tmp_path / "b", "--max-steps", "24", "--checkpoint", ckpt, "--resume", ranks=1)[0]
    assert resumed["steps"] == 24
    assert resumed["batch_sizes"][:12] == first["batch_sizes"]
    assert resumed["samples"] == first["samples"] + sum(resumed["batch_sizes"][12:])


def test_an_oom_on_one_rank_makes_every_rank_back_off_together(tmp_path) -> None:
    # Only rank 1 has a budget: 12 kB, below the ~16 kB a local micro-batch of 64 peaks at.
    r0, r1 = _run(tmp_path, "--max-steps", "6", "--policy", "fixed", "--batch", "128",
                  "--rank1-budget", "12000", ranks=2)
    assert r0["oom_retries"] == r1["oom_retries"] >= 1
    assert r0["micro"] == r1["micro"] and max(r0["micro"]) < 64
    assert len(set(r0["micro"])) == 1  # backed off once, in the first step, then kept
    assert r0["batch_sizes"] == [128] * 6 and r0["samples"] == 6 * 128
    assert r0["weights"] == r1["weights"]


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_resume_matches(tmp_path) -> None:
    # Rank 1 alone is signalled; the flag rides in the step's gradient all-reduce, so both
    # ranks stop after the same step (no collective of its own), rank 0 writes the checkpoint,
    # and the resumed pair ends with the weights of a pair never stopped.
    args = ("--max-steps", "30", "--policy", "gns", "--checkpoint", str(tmp_path / "ckpt"))
    r0, r1 = _run(tmp_path / "stopped", *args, "--sigterm-rank1-at", "12", ranks=2)
    assert r0["exit"] == r1["exit"] == 143
    assert r0["last_step"] == r1["last_step"] == 13  # signalled after step 12's all-reduce
    from autobatch.train.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "ckpt")["result"]["steps"] == 13
    resumed = _run(tmp_path / "resumed", *args, "--resume", ranks=2)
    full = _run(tmp_path / "full", "--max-steps", "30", "--policy", "gns", ranks=2)
    assert resumed[0]["weights"] == resumed[1]["weights"] == full[0]["weights"]
    assert resumed[0]["batch_sizes"] == full[0]["batch_sizes"] and resumed[0]["steps"] == 30
