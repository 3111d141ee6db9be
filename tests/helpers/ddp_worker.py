"""One process of a data-parallel test run: `torchrun --nproc-per-node=2 ddp_worker.py OUT ...`.

Trains a small MLP on a fixed regression problem with autobatch.fit and writes what the test
compares (batch sizes, weights, noise estimate) to OUT/rank<r>.json. Also runs as a single
process (plain `python ddp_worker.py OUT ...`).
"""

import argparse
import json
import os
import signal

import torch
from torch import nn

import autobatch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--policy", default="gns")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--smoothing", type=float, default=0.95)
    p.add_argument("--gns-method", default="micro")
    p.add_argument("--lr-scaling", default=None)
    p.add_argument("--max-micro", type=int, default=None, help="max_micro_batch_size")
    p.add_argument("--rank1-budget", type=int, default=None, help="memory budget on rank 1 only")
    p.add_argument("--sigterm-rank1-at", type=int, default=None,
                   help="rank 1 sends itself SIGTERM at the end of this step")
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 2.0 * torch.randn(1024, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    rank = int(os.environ.get("RANK", "0"))
    budget = {"memory_budget": args.rank1_budget, "probe_memory": False} if args.rank1_budget and rank == 1 else {}
    seen = []

    class Steps(autobatch.Callback):
        def on_step_end(self, record) -> None:
            seen.append(record.step)
            if rank == 1 and record.step == args.sigterm_rank1_at:
                os.kill(os.getpid(), signal.SIGTERM)  # held by fit until the step is done

    try:
        res = _fit(model, x, y, args, budget, [Steps()])
    except SystemExit as err:  # fit's Preempted, after the checkpoint
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as fh:
            json.dump({"rank": rank, "exit": err.code, "last_step": seen[-1]}, fh)
        return
    write(args, rank, model, res)


def _fit(model, x, y, args, budget, callbacks):
    return autobatch.fit(
        model, (x, y), loss_fn=lambda o, t: ((o - t) ** 2).mean(), lr=args.lr,
        max_steps=args.max_steps, initial_batch_size=args.batch, policy=args.policy,
        decide_every=4, gns_smoothing=args.smoothing, progress=False,
        checkpoint_dir=args.checkpoint, resume=args.resume,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        max_micro_batch_size=args.max_micro, gns_method=args.gns_method, lr_scaling=args.lr_scaling,
        callbacks=callbacks, **budget,
    )


def write(args, rank, model, res) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    last = res.history[-1]
    est = [r for r in res.history if r.noise_scale == r.noise_scale]
    out = {
        "rank": rank,
        "world_size": world,
        "batch_sizes": [r.batch_size for r in res.history],
        "micro": [r.micro_batch_size for r in res.history],
        "weights": [t.tolist() for t in model.state_dict().values()],
        "noise_scale": last.noise_scale,
        "noise_scale_stderr": last.noise_scale_stderr,
        "steps": res.steps,
        "oom_retries": res.oom_retries,
        "samples": res.samples,
        "train_loss": [r.train_loss for r in res.history],
        "has_estimate": bool(est),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    from ddp_exit import finish

    main()
    finish()
