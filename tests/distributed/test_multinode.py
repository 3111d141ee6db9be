"""Two nodes on this machine: two torchrun agents on 127.0.0.1 (c10d rendezvous, one process
each) give the one-node, two-process result, for DDP (tests/helpers/ddp_worker.py) and FSDP2
(tests/helpers/fsdp_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch build without gloo"),
    pytest.mark.distributed,
    pytest.mark.slow,
]

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
            "OMP_NUM_THREADS": "1"}


def _two_nodes(worker: str, out: Path, *args: str) -> list[dict]:
    port = _free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=autobatch-{port}",
             worker, str(out), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for node in (0, 1)
    ]
    logs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, logs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _one_node(worker: str, out: Path, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           worker, str(out), *args], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize(("worker", "args"), [
    ("ddp_worker.py", ("--max-steps", "20", "--policy", "gns", "--batch", "32")),
    ("fsdp_worker.py", ("--max-steps", "12", "--batch", "16", "--max-micro", "4", "--gns-method", "micro",
                        "--policy", "gns", "--decide-every", "4", "--lr", "0.1")),
])
def test_two_nodes_on_localhost_give_the_one_node_result(tmp_path: Path, worker: str, args: tuple[str, ...]) -> None:
    nodes = _two_nodes(str(HELPERS / worker), tmp_path / "nodes", *args)
    node = _one_node(str(HELPERS / worker), tmp_path / "node", *args)
    for a, b in zip(nodes, node, strict=True):
        assert a["batch_sizes"] == b["batch_sizes"]
        assert a["weights"] == b["weights"]  # the same collectives, in the same order: bit for bit
