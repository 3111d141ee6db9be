"""A short fit whose final evaluation waits, for tests/subprocess/test_signal_in_final_eval.py.

``python final_eval_worker.py DIR`` trains ``STEPS`` steps with a checkpoint every 3 (the last
periodic one at step 6) and no evaluation before the end. The final evaluation (``eval_fn``)
creates ``DIR/evaluating`` and waits until ``DIR/go`` exists, so the test can send a signal
while it runs.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

import autobatch

STEPS = 7


def _waiting_eval(directory: Path):
    def evaluate(model: nn.Module) -> dict[str, float]:
        (directory / "evaluating").touch()
        deadline = time.monotonic() + 120
        while not (directory / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # a signal handler runs here, between two sleeps
        return {"val_loss": 0.0}

    return evaluate


if __name__ == "__main__":
    torch.set_num_threads(1)
    # Python's own SIGINT handler, which a shell running the suite in the background replaces
    # by "ignore" (see interrupt_worker.py).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    directory = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 8, generator=g), torch.randn(512, 1, generator=g)
    autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=nn.functional.mse_loss, lr=0.01, max_steps=STEPS,
                  initial_batch_size=16, policy="fixed", checkpoint_every=3, checkpoint_dir=directory,
                  eval_fn=_waiting_eval(directory), progress=False)
    print("returned", flush=True)
