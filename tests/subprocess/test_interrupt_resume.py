"""SIGINT and SIGTERM at random moments of a fit, each resumed from the interrupt's own
checkpoint: bit-identical weights. The fit runs in a subprocess
(tests/helpers/interrupt_worker.py) that the test signals for real."""

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
from tests.helpers import interrupt_worker as worker_module

_WORKER = Path(worker_module.__file__)  # run as a script by the subprocesses


def _read(proc: subprocess.Popen) -> str:
    """The worker's next line; a step's number is acknowledged (the worker waits for it)."""
    line = proc.stdout.readline()
    if line and line.split()[0] != "stopped":
        proc.stdin.write("\n")
        proc.stdin.flush()
    return line


@pytest.mark.slow
def test_sigint_and_sigterm_at_random_moments_then_resume_give_bit_identical_weights(tmp_path) -> None:
    worker = worker_module  # the reference run is the workers' own code
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker process
    try:
        full_model, full = worker.run(str(tmp_path / "full"))
        rng = random.Random(0)
        directory, done = tmp_path / "interrupted", 0
        # 12 interrupts, SIGINT and SIGTERM in turn, each at a random moment of a random step,
        # each resumed from the interrupt's own checkpoint (the only one written, so every
        # step it counts wrongly shows in the weights): the first process survives 5 and is
        # ended by the 6th (a SIGTERM), the second survives 6 and runs to the end.
        for survive in (5, 6):
            proc = subprocess.Popen([sys.executable, str(_WORKER), str(directory), str(survive)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)

            for trial in range(6):
                sig = signal.SIGINT if trial % 2 == 0 else signal.SIGTERM
                at_step, delay = done + rng.randint(1, 3), rng.uniform(0, 0.004)
                while int(_read(proc)) < at_step:
                    pass
                time.sleep(delay)  # the worker runs its next step meanwhile
                proc.send_signal(sig)
                if trial < survive:
                    line = _read(proc)
                    while line and line.split()[0] != "stopped":  # steps that ended before the signal
                        line = _read(proc)
                    assert line, f"the worker ended before 'stopped' (at_step {at_step}): {proc.stderr._read(proc)}"
                    name = "KeyboardInterrupt" if sig == signal.SIGINT else "Preempted"
                    assert line.split()[1] == name, line
                else:
                    _, err = proc.communicate(timeout=60)
                    # a clean exit after SIGTERM: status 143, no traceback
                    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
                ckpt = load_checkpoint(directory)
                stream = ckpt["stream"]
                # the counters count every example the stream handed out: none skipped
                assert ckpt["result"]["samples"] == stream["epoch"] * stream["num_examples"] + stream["position"]
                assert at_step <= ckpt["result"]["steps"] < worker.MAX_STEPS
                done = ckpt["result"]["steps"]
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert load_checkpoint(directory)["result"]["steps"] == worker.MAX_STEPS
        model, result = worker.run(str(directory))
        assert (result.steps, result.samples) == (full.steps, full.samples)
        assert [r.batch_size for r in result.history] == [r.batch_size for r in full.history]
        for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    finally:
        torch.set_num_threads(threads)
