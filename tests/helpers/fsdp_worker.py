"""One process of an FSDP2 test run: ``torchrun --nproc-per-node=N fsdp_worker.py OUT ...``.

Builds a 2-block causal transformer (:class:`autobatch.testing.BlockTransformer`), shards it as
FSDP2 users do (``fully_shard`` on each block, then on the root; ``--mesh hsdp`` shards on a
2-D (replicate, shard) mesh), trains it with ``autobatch.fit`` and writes what the tests
compare to ``OUT/rank<r>.json``: the batch sizes, the norms every step handed the estimator,
the full (unsharded) weights, the counters. ``--mesh none`` trains the same model unsharded in
one process, the reference.
"""

import argparse
import json
import os
import sys

import torch

import autobatch
from autobatch.testing import BlockTransformer, markov_tokens, token_cross_entropy
from autobatch.train.controller import BatchSizeController


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--mesh", choices=("fsdp", "hsdp", "none"), default="fsdp")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--policy", default="fixed")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--max-micro", type=int, default=None)
    p.add_argument("--gns-method", default="off")
    p.add_argument("--reduce", default="micro_batch")
    p.add_argument("--decide-every", type=int, default=4)
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--exit", choices=("finish", "normal"), default="finish",
                   help="finish: leave through os._exit once the results are written; normal: interpreter exit")
    p.add_argument("--no-weights", action="store_true", help="skip gathering the full weights (a collective)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BlockTransformer(vocab=16, width=16, length=8, depth=2)
    x, y = markov_tokens(480, vocab=16, length=8, seed=1)
    rank = 0
    if args.mesh != "none":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.mesh == "hsdp":  # replicate across the first dimension, shard within the second
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    seen = []
    observe = BatchSizeController.observe

    def recording(self, **kw):  # the norms each step hands the estimator
        norms = kw.get("norms")
        seen.append(None if norms is None else {
            "small": list(norms.small_sq_norms), "small_batch": norms.small_batch_size, "big": norms.big_sq_norm})
        return observe(self, **kw)

    BatchSizeController.observe = recording
    opt = (torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW)
    res = autobatch.fit(
        model, (x, y), loss_fn=token_cross_entropy, optimizer=opt, lr=args.lr, max_steps=args.max_steps,
        initial_batch_size=args.batch, policy=args.policy, decide_every=args.decide_every, gns_method=args.gns_method,
        lr_scaling="linear" if args.policy == "fixed" else None, max_micro_batch_size=args.max_micro,
        fsdp_reduce=args.reduce, max_grad_norm=args.max_grad_norm, progress=False, shuffle=False,
        checkpoint_dir=args.checkpoint, resume=args.resume)
    weights = {} if args.no_weights else _full_weights(model, args.mesh != "none")
    out = {
        "rank": rank,
        "batch_sizes": [r.batch_size for r in res.history],
        "examples": [r.examples for r in res.history],
        "micro": [r.micro_batch_size for r in res.history],
        "losses": [r.train_loss for r in res.history],
        "noise_scale": [r.noise_scale for r in res.history],
        "norms": seen,
        "steps": res.steps,
        "samples": res.samples,
        "weights": {k: v.tolist() for k, v in weights.items()},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)
    if args.exit == "finish":
        from ddp_exit import finish

        finish()


def _full_weights(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    if not sharded:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


if __name__ == "__main__":
    sys.exit(main())
