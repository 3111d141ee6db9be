"""Bad FSDP2 setups, each tried with ``autobatch.fit`` in one torchrun launch (every rank):
``torchrun --nproc-per-node=2 fsdp_errors_worker.py OUT``. Writes ``OUT/rank<r>.json`` with the
error message each setup raised (or ``null`` if it trained), and whether any step ran before.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import autobatch
from autobatch.testing import BlockTransformer, markov_tokens, token_cross_entropy


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = markov_tokens(64, vocab=16, length=8, seed=1)
    steps = []

    class Count(autobatch.Callback):
        def on_step_end(self, record) -> None:
            steps.append(record.step)

    def attempt(model, **kw) -> str | None:
        steps.clear()
        args = dict(loss_fn=token_cross_entropy, lr=0.1, max_steps=2, initial_batch_size=8, policy="fixed",
                    gns_method="off", lr_scaling="none", progress=False, callbacks=[Count()])
        try:
            autobatch.fit(model, (x, y), **{**args, **kw})
        except ValueError as err:
            return str(err)
        return None

    def model(shard_blocks: bool = True, shard_root: bool = True, mesh=None):
        torch.manual_seed(0)
        m = BlockTransformer(vocab=16, width=16, length=8, depth=2)
        mesh = mesh if mesh is not None else init_device_mesh("cpu", (world,))
        if shard_blocks:
            for block in m.blocks:
                fully_shard(block, mesh=mesh)
        if shard_root:
            fully_shard(m, mesh=mesh)
        return m

    results = {
        "partly_sharded": attempt(model(shard_root=False)),
        "batch_below_ranks": attempt(model(), initial_batch_size=world - 1),
        "device_mismatch": attempt(model(), device="meta"),
        "probe_requested": attempt(model(), probe_memory=True),
    }
    ckpt = os.path.join(out, "ckpt")
    # a checkpoint of an unsharded run (DDP), resumed by a sharded one, and the other way round
    torch.manual_seed(0)
    plain = BlockTransformer(vocab=16, width=16, length=8, depth=2)
    assert attempt(plain, checkpoint_dir=ckpt + "-ddp") is None
    results["ddp_ckpt_resumed_sharded"] = attempt(model(), checkpoint_dir=ckpt + "-ddp", resume=True)
    err = attempt(model(), checkpoint_dir=ckpt + "-fsdp")
    assert err is None, err
    torch.manual_seed(0)
    plain = BlockTransformer(vocab=16, width=16, length=8, depth=2)
    before = [p.detach().clone() for p in plain.parameters()]
    results["fsdp_ckpt_resumed_unsharded"] = attempt(plain, checkpoint_dir=ckpt + "-fsdp", resume=True)
    results["unsharded_model_untouched"] = all(torch.equal(a, b) for a, b in zip(before, plain.parameters()))
    results["steps_before_errors"] = list(steps)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    from ddp_exit import finish

    finish()


if __name__ == "__main__":
    main()
