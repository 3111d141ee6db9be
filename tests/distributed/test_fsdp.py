"""FSDP2 under autobatch.fit: a 2-block transformer sharded per block and at the root, 2-4 gloo
processes on CPU launched by torchrun (tests/helpers/fsdp_worker.py), against one unsharded
process and against gradients computed by brute force."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from autobatch.testing import BlockTransformer, markov_tokens, token_cross_entropy

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch build without gloo"),
    pytest.mark.distributed,
    pytest.mark.slow,
]

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
WORKER = str(HELPERS / "fsdp_worker.py")


def _launch(out: Path, *args: str, ranks: int, worker: str = WORKER, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               worker, str(out), *args]
    else:
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        cmd = [sys.executable, worker, str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _run(out: Path, *args: str, ranks: int) -> dict:
    """rank 0's results (the others hold the same reduced numbers)."""
    _launch(out, *args, *(() if ranks > 1 else ("--mesh", "none")), ranks=ranks)
    return json.loads((out / "rank0.json").read_text())


def _max_weight_diff(a: dict, b: dict) -> float:
    return max(float((torch.tensor(a["weights"][k]) - torch.tensor(b["weights"][k])).abs().max()) for k in a["weights"])


@pytest.mark.parametrize(("ranks", "args"), [
    (2, ("--batch", "24", "--max-micro", "4")),  # 3 micro-batches a rank, a reduce-scatter after each
    (3, ("--batch", "25", "--max-micro", "4", "--reduce", "step", "--max-grad-norm", "0.3")),  # uneven shares, clipped
    (3, ("--batch", "7", "--max-micro", "1")),  # shares 3, 2, 2: two ranks run a zero-weight pass each step
    (4, ("--batch", "24", "--max-micro", "3", "--mesh", "hsdp")),  # 2 replicas x 2 shards
])
def test_a_sharded_fixed_batch_run_trains_like_one_process(tmp_path: Path, ranks: int, args: tuple[str, ...]) -> None:
    common = ("--max-steps", "8", "--lr", "0.2")
    single = _run(tmp_path / "single", *common, *[a for a in args if a not in ("--mesh", "hsdp")], ranks=1)
    sharded = _run(tmp_path / "sharded", *common, *args, ranks=ranks)
    assert sharded["steps"] == single["steps"] == 8 and sharded["samples"] == single["samples"]
    assert _max_weight_diff(single, sharded) <= 1e-5
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)


def _brute_force_norms(batch: int, small: int, steps: int) -> list[tuple[float, float]]:
    """``(|G_B|^2, mean over the step's small batches of |G_b|^2)`` of the worker's first steps,
    at its initial weights (its runs use lr 1e-9), with plain per-batch gradients."""
    torch.manual_seed(0)
    model = BlockTransformer(vocab=16, width=16, length=8, depth=2)
    x, y = markov_tokens(480, vocab=16, length=8, seed=1)

    def sq(idx: torch.Tensor) -> float:
        model.zero_grad()
        token_cross_entropy(model(x[idx]), y[idx]).backward()
        return float(sum(p.grad.double().square().sum() for p in model.parameters()))

    out = []
    for s in range(steps):
        idx = torch.arange(batch * s, batch * (s + 1))  # shuffle=False: the steps are consecutive
        smalls = [sq(c) for c in idx.split(small)]
        out.append((sq(idx), sum(smalls) / len(smalls)))
    return out


@pytest.mark.parametrize(("ranks", "args", "small"), [
    (2, ("--max-micro", "4"), 4),  # small batches: every rank's micro-batches
    (3, ("--max-micro", "4", "--reduce", "step"), 8),  # the reduce-scatter once a step: every rank's share
    (4, ("--max-micro", "3", "--mesh", "hsdp"), 3),  # HSDP: a shard's norm counted once, not per replica
])
def test_the_noise_scale_parts_under_sharding_equal_brute_force(tmp_path: Path, ranks: int, args: tuple[str, ...],
                                                                small: int) -> None:
    run = _run(tmp_path, "--batch", "24", "--max-steps", "3", "--lr", "1e-9", "--gns-method", "micro", *args,
               ranks=ranks)
    for got, (big, smalls) in zip(run["norms"], _brute_force_norms(24, small, 3), strict=True):
        assert got["big"] == pytest.approx(big, rel=1e-5)
        assert got["small"] == [pytest.approx(smalls, rel=1e-5)]
        assert got["small_batch"] == pytest.approx(small, rel=1e-6)


def test_the_adaptive_batch_grows_as_in_one_process(tmp_path: Path) -> None:
    # One process with a micro-batch cap of 4 measures the same small batches, in the same
    # order, as two FSDP ranks with micro-batches of 4: the decisions are the same.
    args = ("--batch", "16", "--max-steps", "40", "--lr", "0.1", "--gns-method", "micro", "--policy", "gns",
            "--max-micro", "4", "--decide-every", "5")
    single = _run(tmp_path / "single", *args, ranks=1)
    sharded = _run(tmp_path / "sharded", *args, ranks=2)
    assert sharded["batch_sizes"] == single["batch_sizes"]
    assert max(single["batch_sizes"]) > 16  # it did grow
    assert sharded["noise_scale"] == pytest.approx(single["noise_scale"], rel=1e-4, nan_ok=True)


def test_a_sharded_checkpoint_written_on_2_ranks_resumes_on_3(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    fixed = ("--batch", "24", "--max-micro", "4", "--lr", "0.2")
    _run(tmp_path / "first", *fixed, "--max-steps", "6", "--checkpoint", ckpt, ranks=2)
    resumed = _run(tmp_path / "resumed", *fixed, "--max-steps", "12", "--checkpoint", ckpt, "--resume", ranks=3)
    whole = _run(tmp_path / "whole", *fixed, "--max-steps", "12", ranks=1)
    assert resumed["steps"] == 12 and resumed["samples"] == whole["samples"] == 12 * 24
    assert _max_weight_diff(whole, resumed) <= 1e-4
    # the adaptive default (budget policy): the history comes back, and the first resumed step
    # runs at the batch size decided before the interruption
    ckpt = str(tmp_path / "ckpt-adaptive")
    adaptive = ("--batch", "16", "--max-micro", "4", "--lr", "0.1", "--gns-method", "micro", "--policy", "budget",
                "--decide-every", "5")
    first = _run(tmp_path / "a1", *adaptive, "--max-steps", "20", "--checkpoint", ckpt, ranks=2)
    saved = torch.load(Path(ckpt) / "last.pt", weights_only=True)
    decided = saved["controller"]["batch_size"]
    again = _run(tmp_path / "a2", *adaptive, "--max-steps", "25", "--checkpoint", ckpt, "--resume", ranks=3)
    assert again["batch_sizes"][:20] == first["batch_sizes"] and again["examples"][20] == decided
    assert again["samples"] == first["samples"] + sum(again["examples"][20:])


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PLANTED_MARK']}",))


def test_a_crafted_shard_metadata_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _run(tmp_path / "first", "--max-steps", "2", "--checkpoint", str(ckpt), ranks=2)
    (folder,) = [p for p in ckpt.iterdir() if p.name.startswith("sharded-")]
    mark = tmp_path / "code-ran"
    os.environ["PLANTED_MARK"] = str(mark)
    try:
        (folder / ".metadata").write_bytes(pickle.dumps(_Planted()))
    finally:
        del os.environ["PLANTED_MARK"]
    proc = _launch(tmp_path / "again", "--max-steps", "4", "--checkpoint", str(ckpt), "--resume", ranks=2, check=False)
    assert proc.returncode != 0 and not mark.exists()
    assert "refusing to resume from the sharded checkpoint" in proc.stderr
    assert "posix.system is not part of a checkpoint's metadata" in proc.stderr


def test_bad_sharded_setups_are_refused_before_any_step(tmp_path: Path) -> None:
    _launch(tmp_path, ranks=2, worker=str(HELPERS / "fsdp_errors_worker.py"))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "partly sharded: 24 of its 30 trainable parameters are DTensors" in got["partly_sharded"]
        assert "a step needs at least 2 examples (got initial_batch_size=1" in got["batch_below_ranks"]
        assert "sharded on a cpu mesh but fit trains on device=meta" in got["device_mismatch"]
        assert "memory probe does not run on a model sharded with fully_shard" in got["probe_requested"]
        assert "written for an unsharded model (one process or DDP), and this run's model is sharded" in got[
            "ddp_ckpt_resumed_sharded"]
        assert "written for a model sharded with fully_shard, and this run's model is unsharded" in got[
            "fsdp_ckpt_resumed_unsharded"]
        assert got["unsharded_model_untouched"] and got["steps_before_errors"] == []


def test_sharded_runs_exit_cleanly(tmp_path: Path) -> None:
    # AdamW with the reduce-scatter deferred to the step's end: without fit's exit pause, 6 of
    # 16 such runs aborted after their work was done (SIGABRT at interpreter exit).
    for i in range(6):
        proc = _launch(tmp_path / str(i), "--max-steps", "3", "--optimizer", "adamw", "--lr", "1e-3", "--reduce", "step",
                       "--max-micro", "6", "--exit", "normal", "--no-weights", ranks=2, check=False)
        assert proc.returncode == 0, f"run {i}: {proc.stderr[-2000:]}"
        assert (tmp_path / str(i) / "rank1.json").exists()
