"""AdaptiveBatchSize under Lightning's DDP strategy: two gloo ranks launched by torchrun
(tests/helpers/lightning_ddp_worker.py) against the same global batches on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = str(Path(__file__).resolve().parents[1] / "helpers" / "lightning_ddp_worker.py")


def test_two_ddp_ranks_agree_on_b_and_match_one_process(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    # both runs at once: the machine's second core would otherwise sit out the single process
    procs = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          WORKER, str(ddp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
        subprocess.Popen([sys.executable, WORKER, str(single)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}),
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    r0, r1 = (json.loads((ddp / f"rank{r}.json").read_text()) for r in range(2))
    (one,) = [json.loads((single / "rank0.json").read_text())]
    assert r0["world_size"] == 2 and one["world_size"] == 1
    assert r0["batch_sizes"] == r1["batch_sizes"]
    assert r0["weights"] == r1["weights"]
    assert max(r0["batch_sizes"]) >= 4 * r0["batch_sizes"][0]
    # Each rank's micro-batch of 8 is one of the single process's: same steps, same decisions.
    assert r0["batch_sizes"] == one["batch_sizes"]
    assert r0["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
