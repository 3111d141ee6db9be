"""A study under torchrun: rank 0 owns it, the other ranks follow its trials
(tests/helpers/ddp_tune_worker.py)."""

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

WORKER = str(Path(__file__).resolve().parents[1] / "helpers" / "ddp_tune_worker.py")


@pytest.mark.parametrize("prune", [False, True])
def test_a_study_under_torchrun_is_owned_by_rank_0_and_followed_by_the_others(tmp_path, prune) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           WORKER, str(tmp_path), str(tmp_path / "study.db"), *(["--prune"] if prune else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["returned"] and not r1["returned"]
    assert len(r0["trials"]) == 4  # one study, four trials, written by rank 0 only
    lrs = sorted(t["lr"] for t in r0["trials"])
    assert r1["seen"] == pytest.approx(lrs) and r0["seen"] == pytest.approx(lrs)
    if prune:  # rank 0's pruner stopped trials 1-3 on both ranks (no hang, same trials after)
        states = [t["state"] for t in r0["trials"]]
        assert states[1:] == ["PRUNED"] * 3, states
