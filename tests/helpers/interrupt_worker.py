"""A small fit that checkpoints only when interrupted, for tests/subprocess/test_interrupt_resume.py.

``python interrupt_worker.py DIR SURVIVE`` trains (resuming from ``DIR/last.pt`` when there is
one) and prints each finished step's number, then waits for a line on stdin (the test reads in
step with it); the test sends SIGINT or SIGTERM at random moments. The first SURVIVE interrupts
are caught (``stopped N`` is printed once the checkpoint is written) and the run resumes from
the checkpoint in a fresh model, in the same process (a process start costs seconds); the next
one ends the process. No periodic checkpoint: the only ``last.pt`` is the interrupt's own, so a
step counted wrongly there shows in the final weights. Dropout and BatchNorm make the RNG and
the buffers part of what must be restored.
"""

from __future__ import annotations

import signal
import sys

import torch
from torch import nn

import autobatch

MAX_STEPS = 80


class _Say(autobatch.Callback):
    def on_step_end(self, record) -> None:
        print(record.step, flush=True)
        # Wait for the test to read it (a line on stdin; end of file: go on): on a loaded
        # machine the run would otherwise race ahead of the reader, and its signals would land
        # dozens of steps after the moment drawn (or after the run's end).
        sys.stdin.readline()


def run(directory: str, say: bool = False) -> tuple[nn.Module, autobatch.FitResult]:
    """Train (or resume) to MAX_STEPS, writing ``directory/last.pt`` only when stopped."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 32, generator=g)
    y = x @ torch.randn(32, 1, generator=g) + 2.0 * torch.randn(1000, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    result = autobatch.fit(model, (x, y), loss_fn=nn.functional.mse_loss, lr=0.01, max_steps=MAX_STEPS,
                           optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
                           initial_batch_size=32, decide_every=3, checkpoint_dir=directory,
                           resume=True, callbacks=[_Say()] if say else [],
                           progress=False)
    return model, result


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the test's in-process runs, so the arithmetic is the same
    # A shell that starts the test suite in the background (``cmd &``) leaves SIGINT ignored in
    # it and in every child, and fit rightly keeps a handler it did not install; a user's
    # process has Python's own, which this worker stands for.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    survive = int(sys.argv[2])
    while True:
        try:
            run(sys.argv[1], say=True)
            break
        except (KeyboardInterrupt, SystemExit) as err:
            if survive == 0:
                raise
            survive -= 1
            print(f"stopped {type(err).__name__}", flush=True)
