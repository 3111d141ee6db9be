"""AdaptiveBatchTrainer under torchrun: two gloo processes through the Trainer's own DDP
(tests/helpers/hf_ddp_worker.py) against one process, on a tiny GPT-2 with padded token-mean losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch build without gloo"),
    pytest.mark.distributed,
    pytest.mark.slow,
]

WORKER = str(Path(__file__).resolve().parents[1] / "helpers" / "hf_ddp_worker.py")


def _run(out: Path, ranks: int, steps: int = 40) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
           if ranks > 1 else [sys.executable]) + [WORKER, str(out), str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_two_processes_agree_on_b_and_match_one_process(tmp_path: Path) -> None:
    # SGD (Adam would turn rounding into whole LR steps); each process's share is one of the
    # one-process run's micro-batches, so both measure the same small batches.
    (single,) = _run(tmp_path / "single", ranks=1)
    ranks = _run(tmp_path / "ddp", ranks=2)
    assert ranks[0]["batch_sizes"] == ranks[1]["batch_sizes"] == single["batch_sizes"]
    assert max(single["batch_sizes"]) > 4  # the policy moved B
    assert ranks[0]["samples"] == single["samples"]
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for name, value in single["weights"].items():
        assert torch.allclose(torch.tensor(ranks[0]["weights"][name]), torch.tensor(value), atol=1e-5), name
        assert ranks[0]["weights"][name] == ranks[1]["weights"][name]
