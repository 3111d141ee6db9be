"""A small fit that checkpoints after every step, for tests/subprocess/test_kill_resume.py (kill -9).

``python checkpoint_worker.py DIR`` trains (resuming from ``DIR/last.pt`` when there is one)
and prints each finished step's number; the test kills it at a random moment and resumes
in its own process with :func:`run`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import autobatch

MAX_STEPS = 40


class _Say(autobatch.Callback):
    def on_step_end(self, record) -> None:
        print(record.step, flush=True)
        sys.stdin.readline()  # wait for the test to read it (end of file: go on), so it never races ahead


def run(directory: str, say: bool = False) -> tuple[nn.Module, autobatch.FitResult]:
    """Train (or resume) to MAX_STEPS with a checkpoint in ``directory`` after every step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 2.0 * torch.randn(600, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 1))
    result = autobatch.fit(model, (x, y), loss_fn=nn.functional.mse_loss, lr=0.02, max_steps=MAX_STEPS,
                           optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
                           initial_batch_size=16, decide_every=3, checkpoint_dir=directory,
                           checkpoint_every=1, resume=True, callbacks=[_Say()] if say else [],
                           progress=False)
    return model, result


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the test's in-process runs, so the arithmetic is the same
    run(sys.argv[1], say=True)
