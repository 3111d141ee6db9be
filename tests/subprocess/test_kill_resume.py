"""kill -9 at random moments of a fit (checkpoint writes included), then ``resume=True``:
bit-identical weights. The fit runs in a subprocess (tests/helpers/checkpoint_worker.py)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autobatch.train.checkpoint import load_checkpoint
from tests.helpers import checkpoint_worker as worker_module

_WORKER = Path(worker_module.__file__)  # run as a script by the subprocesses


@pytest.mark.slow  # three subprocesses of a few seconds each
def test_kill_9_at_random_moments_then_resume_gives_bit_identical_weights(tmp_path) -> None:
    worker = worker_module  # the reference run is the workers' own code
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker process
    try:
        full_model, full = worker.run(str(tmp_path / "full"))
        rng = random.Random(0)
        # A checkpoint after every step: a good share of each run is spent writing one, so a
        # random moment often falls inside a write.
        for trial in range(3):
            directory = tmp_path / f"killed{trial}"
            at_step, delay = rng.randint(2, worker.MAX_STEPS - 10), rng.uniform(0, 0.03)
            proc = subprocess.Popen([sys.executable, str(_WORKER), str(directory)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            for line in proc.stdout:
                proc.stdin.write("\n")  # the worker waits for each step to be read
                proc.stdin.flush()
                if int(line) >= at_step:
                    break
            time.sleep(delay)  # the checkpoint of that step, or the next step, runs meanwhile
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL
            done = load_checkpoint(directory)["result"]["steps"]
            # killed mid-run (a step is announced just before its checkpoint is written)
            assert at_step - 1 <= done < worker.MAX_STEPS
            model, result = worker.run(str(directory))
            assert (result.steps, result.samples) == (full.steps, full.samples)
            assert [r.batch_size for r in result.history] == [r.batch_size for r in full.history]
            for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values(), strict=True):
                assert torch.equal(a, b), (trial, at_step, name)
    finally:
        torch.set_num_threads(threads)
