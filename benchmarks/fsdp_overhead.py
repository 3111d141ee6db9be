"""FSDP2 step time with the noise-scale estimator over time without it, 2 ranks, for both ways
of syncing gradients during accumulation; and what each way holds between micro-batches.

Run it as a module from the repository root: it relaunches itself under
``torchrun --nproc-per-node=2`` (gloo on CPU). A causal transformer of 4 blocks
(:class:`autobatch.testing.BlockTransformer`, width 128, context 32) is sharded as FSDP2
users do (``fully_shard`` on each block, then the root) and trained with ``autobatch.fit``:
fixed policy, no LR scaling, a global batch of 32 in micro-batches of 4 (4 per rank per
step), so that every variant does the same optimisation work. In one torchrun session the
variants alternate round by round (the order rotates), each round a short fit:

- ``memory.fsdp_reduce``: ``"micro_batch"`` (a reduce-scatter after every micro-batch, the
  default) or ``"step"`` (one, after the step's last micro-batch);
- ``gns_method``: ``"off"`` or ``"micro"`` (the estimator reads each reduce-scatter's input).

The per-step time of a round is the median of the step-to-step differences after a warm-up
(wall clock and the rank's CPU time); the on/off ratios are medians over rounds of the ratio
within a round. Gradient bytes held: the largest total, at the start of a micro-batch's forward,
of the sharded gradients plus FSDP's unsharded gradient buffers (read from FSDP's parameter
objects, private API, in this benchmark only).

    python -m benchmarks.fsdp_overhead            # about 4-5 minutes on this 2-core CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks._run_info import git_commit

RESULTS = Path(__file__).resolve().parent / "results" / "fsdp_overhead.json"
WIDTH, DEPTH, LENGTH, VOCAB = 128, 4, 32, 128
BATCH, MICRO = 32, 4
VARIANTS = [(reduce, method) for reduce in ("micro_batch", "step") for method in ("off", "micro")]


def _model():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from autobatch.testing import BlockTransformer

    torch.manual_seed(0)
    model = BlockTransformer(vocab=VOCAB, width=WIDTH, length=LENGTH, depth=DEPTH)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _grad_bytes(model) -> int:
    """Sharded gradients plus FSDP's unsharded gradient buffers now alive (bytes)."""
    from autobatch.noise.sharded import _param_groups, fsdp_units

    total = 0
    for unit in fsdp_units(model):
        for group in _param_groups(unit):
            for fp in group.fsdp_params:
                sharded_grad = fp.sharded_param.grad
                if sharded_grad is not None:
                    total += sharded_grad.to_local().nbytes
                unsharded = getattr(fp, "_unsharded_param", None)
                grad = getattr(unsharded, "grad", None) if unsharded is not None else None
                if grad is not None:
                    total += grad.nbytes
                acc = getattr(fp, "unsharded_accumulated_grad", None)
                if acc is not None:
                    total += acc.nbytes
    return total


def _round(reduce: str, method: str, steps: int) -> dict[str, float]:
    """One short fit: median (wall, CPU) seconds per step after 3 warm-up steps, and the most
    gradient bytes held at the start of a micro-batch."""
    import autobatch
    from autobatch.testing import markov_tokens, token_cross_entropy
    from autobatch.train.callbacks import Callback

    clock: list[tuple[float, float]] = []
    held = [0]

    class Clock(Callback):
        def on_step_end(self, record) -> None:
            clock.append((time.perf_counter(), time.process_time()))

    model = _model()
    model.register_forward_pre_hook(lambda module, args: held.__setitem__(0, max(held[0], _grad_bytes(module))))
    x, y = markov_tokens(BATCH * steps, vocab=VOCAB, length=LENGTH, seed=1)
    res = autobatch.fit(model, (x, y), loss_fn=token_cross_entropy, lr=0.01, max_steps=steps, initial_batch_size=BATCH,
                        policy="fixed", lr_scaling="none", gns_method=method, fsdp_reduce=reduce,
                        max_micro_batch_size=MICRO, shuffle=False, progress=False, callbacks=[Clock()])
    assert res.steps == steps
    wall = [b[0] - a[0] for a, b in itertools.pairwise(clock)][3:]
    cpu = [b[1] - a[1] for a, b in itertools.pairwise(clock)][3:]
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "held": held[0]}


def worker(rounds: int, steps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    times: dict[tuple[str, str], list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        shift = r % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            times[variant].append(_round(*variant, steps))
    params = sum(p.numel() for p in _model().parameters())
    rows = {}
    for reduce in ("micro_batch", "step"):
        off, on = times[(reduce, "off")], times[(reduce, "micro")]
        rows[reduce] = {
            "step_ms_off": statistics.median(t["wall"] for t in off) * 1e3,
            "step_ms_on": statistics.median(t["wall"] for t in on) * 1e3,
            "ratios": [a["wall"] / b["wall"] for a, b in zip(on, off, strict=True)],
            "cpu_ratios": [a["cpu"] / b["cpu"] for a, b in zip(on, off, strict=True)],
            "grad_bytes_held": max(t["held"] for t in off + on),
        }
        rows[reduce]["ratio_median"] = statistics.median(rows[reduce]["ratios"])
        rows[reduce]["cpu_ratio_median"] = statistics.median(rows[reduce]["cpu_ratios"])
    if rank == 0:
        out = {"world_size": dist.get_world_size(), "backend": "gloo", "device": "cpu", "torch": torch.__version__,
               "model": {"class": "BlockTransformer", "width": WIDTH, "depth": DEPTH, "context": LENGTH,
                         "vocab": VOCAB, "params": params},
               "global_batch": BATCH, "micro_batch": MICRO, "steps_per_round": steps, "rounds": rounds,
               "target_ratio": 1.03, "commit": git_commit(), "load_average": os.getloadavg(), "modes": rows}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=1))
        print(f"model: {params:,} parameters; global batch {BATCH} in micro-batches of {MICRO}, 2 ranks")
        print(f"{'fsdp_reduce':<12} {'off ms':>8} {'on ms':>8} {'on/off':>7} {'cpu on/off':>10} {'grad MiB held':>14}")
        for reduce, row in rows.items():
            print(f"{reduce:<12} {row['step_ms_off']:>8.1f} {row['step_ms_on']:>8.1f} {row['ratio_median']:>7.3f} "
                  f"{row['cpu_ratio_median']:>10.3f} {row['grad_bytes_held'] / 2**20:>14.2f}")
        print(f"target: estimator on <= 1.03x off; written {RESULTS}")
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="steps per fit (each round runs one fit per variant)")
    args = p.parse_args()
    if "RANK" in os.environ:
        worker(args.rounds, args.steps)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "benchmarks.fsdp_overhead", "--rounds", str(args.rounds), "--steps", str(args.steps)]
    root = Path(__file__).resolve().parent.parent
    sys.exit(subprocess.call(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}))


if __name__ == "__main__":
    main()
