"""One process of the Lightning DDP test: ``torchrun --nproc-per-node=2 lightning_ddp_worker.py OUT``.

Fits tests/helpers/lightning_regression.py's module under Lightning's DDP strategy (gloo, CPU)
with AdaptiveBatchSize and writes this rank's B trajectory and final weights to OUT/rank<r>.json.
Run as a plain process (``python lightning_ddp_worker.py OUT``) it trains the same global
batches on one process: micro-batches of 8 there, where each of the two ranks holds one.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lightning_regression import Regression, loader, quiet_trainer, regression_data

from autobatch.integrations.lightning import AdaptiveBatchSize


def main() -> None:
    out = Path(sys.argv[1])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    x, y = regression_data(n=2048)
    torch.manual_seed(0)
    model = Regression()
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    # One process: B0 = 16 is two micro-batches of 8 and B stays a multiple of 16, as it is
    # (one micro-batch of 8 per rank, times two ranks) under DDP.
    single = {} if ranks > 1 else {"initial_batch_size": 16, "round_to": 16}
    cb = AdaptiveBatchSize(decide_every=5, max_batch_size=512, policy="gns", **single)
    strategy = {"strategy": "ddp", "devices": 2} if ranks > 1 else {}
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], **strategy)
    trainer.fit(model, loader(x, y, batch_size=8))
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": trainer.world_size, "train_loss": [r.train_loss for r in cb.history],
        "batch_sizes": [r.batch_size for r in cb.history],
        "examples": [r.examples for r in cb.history],
        "accum": [r.accum_steps for r in cb.history],
        "noise_scale": [r.noise_scale for r in cb.history],
        "samples": cb.history[-1].samples,
        "weights": [p.detach().flatten().tolist() for p in model.parameters()],
    }))
    # Tear the gloo group down while every rank is still here: a rank that exits with the group
    # alive while its peer still talks to it can abort at interpreter exit ("terminate called
    # without an active exception", SIGABRT), seen once in CI.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
