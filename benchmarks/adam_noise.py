"""Raw against preconditioned gradient noise scale on ``charlm`` (AdamW), along one run.

A plain loop (AdamW, the problem's default LR 3e-3, global batch ``--batch`` split into
``--micro`` micro-batches) carries two collectors on the same backward passes: the raw one
(:class:`~autobatch.noise.MicroBatchNormCollector`, ``|G_b|^2``) and the preconditioned one
(:class:`~autobatch.noise.preconditioned.PreconditionedNormCollector` with Adam's
``1/(sqrt(v_hat)+eps)``), each feeding its own :class:`~autobatch.GradientNoiseScale`. Both
estimates are recorded at every epoch, with the held-out loss.

    python -m benchmarks.adam_noise            # ~2 min on 2 shared cores

Writes ``benchmarks/results/adam_noise.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from autobatch.noise import GradientNoiseScale, MicroBatchNormCollector
from autobatch.noise.preconditioned import (
    PreconditionedNormCollector,
    adam_preconditioner,
)
from autobatch.problems import get_example

OUT = Path(__file__).resolve().parent / "results" / "adam_noise.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--chars", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    ex = get_example("charlm", seed=args.seed, max_chars=args.chars)
    model = ex.model_fn()
    opt = ex.optimizer(model.parameters(), ex.default_lr)
    (x, y), (vx, vy) = ex.train_data, ex.val_data
    raw, pre = MicroBatchNormCollector(model), PreconditionedNormCollector(model, functools.partial(adam_preconditioner, opt))
    est = {"raw": GradientNoiseScale(0.95), "preconditioned": GradientNoiseScale(0.95)}
    gen = torch.Generator().manual_seed(args.seed)
    rows, step, start = [], 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x) - args.batch + 1, args.batch):
            idx = order[s : s + args.batch]
            opt.zero_grad(set_to_none=True)
            raw.begin_step()
            pre.begin_step()
            for part in idx.chunk(args.micro):
                w = len(part) / args.batch
                (ex.loss_fn(model(x[part]), y[part]) * w).backward()
                raw.after_backward(len(part), w)
                pre.after_backward(len(part), w)
            for name, collector in (("raw", raw), ("preconditioned", pre)):
                n = collector.end_step()
                est[name].update(n.small_sq_norms, n.small_batch_size, n.big_sq_norm, n.big_batch_size)
            opt.step()
            step += 1
        with torch.no_grad():
            model.eval()
            val = float(ex.loss_fn(model(vx), vy))
            model.train()
        row = {"epoch": epoch, "step": step, "val_loss": val,
               **{f"{k}_noise_scale": e.noise_scale for k, e in est.items()}}
        row["ratio"] = row["preconditioned_noise_scale"] / row["raw_noise_scale"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    OUT.write_text(json.dumps({
        "task": "charlm", "optimizer": "AdamW", "lr": ex.default_lr, "batch_size": args.batch,
        "micro_batches": args.micro, "chars": args.chars, "seed": args.seed, "smoothing": 0.95,
        "wall_s": time.perf_counter() - start, "rows": rows,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
