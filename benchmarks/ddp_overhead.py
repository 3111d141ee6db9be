"""Data-parallel step time with the noise-scale estimator over time without it, 2 ranks.

Run it as a module from the repository root: it relaunches itself under
``torchrun --nproc-per-node=2`` (gloo on CPU). In one torchrun session the two variants alternate
round by round, each round a short
``autobatch.fit`` of the same model and data:

- ``off``: ``gns_method="off"`` (no norm is read);
- ``micro``: ``gns_method="micro"``: each rank's local gradient is a small batch of the
  estimator: its squared norm is read from the gathered gradient before the all-reduce, and
  the global one after it; the totals ride in the gradient's all-reduce.

Both use the fixed policy (the same B every step) and no LR scaling, so the two variants do
the same optimisation work. The per-step time of a round is the median of the step-to-step
differences after a warm-up, in wall-clock time and in the rank's CPU time (all its threads:
compute and gloo's), which other jobs on a shared machine disturb less; the reported ratios
are the medians over rounds of (micro / off) in the same round, for a few model sizes.

    python -m benchmarks.ddp_overhead            # about 3-4 minutes on this 2-core CPU
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
from pathlib import Path

import torch
from torch import nn

from benchmarks._run_info import git_commit

RESULTS = Path(__file__).resolve().parent / "results" / "ddp_overhead.json"

# name -> (input width, hidden width, depth); global batch 256 = 128 per rank
MODELS = {"mlp-small": (64, 256, 2), "mlp-medium": (256, 1024, 3), "mlp-large": (512, 2048, 3)}
BATCH = 256
# Steps per fit, so that a round lasts about a second or more: with 30 steps (0.1 s) the small
# model's per-round on/off ratios spread from 0.68 to 2.01, scheduler noise and not the estimator.
STEPS = {"mlp-small": 300, "mlp-medium": 30, "mlp-large": 30}


def _model(width: int, hidden: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, 10))


def _step_time(method: str, spec: tuple[int, int, int], steps: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds per step of one short fit, after 3 warm-up steps."""
    import autobatch
    from autobatch.train.callbacks import Callback

    clock: list[tuple[float, float]] = []

    class Clock(Callback):
        def on_step_end(self, record) -> None:
            clock.append((time.perf_counter(), time.process_time()))

    width = spec[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * steps, width, generator=g)
    y = torch.randint(0, 10, (BATCH * steps,), generator=g)
    torch.manual_seed(0)
    res = autobatch.fit(_model(*spec), (x, y), loss_fn=nn.functional.cross_entropy, lr=0.01,
                        max_steps=steps, initial_batch_size=BATCH, policy="fixed", lr_scaling="none",
                        gns_method=method, shuffle=False, progress=False, callbacks=[Clock()])
    assert res.steps == steps
    wall = [b[0] - a[0] for a, b in itertools.pairwise(clock)][3:]
    cpu = [b[1] - a[1] for a, b in itertools.pairwise(clock)][3:]
    return statistics.median(wall), statistics.median(cpu)


def worker(rounds: int, steps_override: int | None) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    rows = {}
    for name, spec in MODELS.items():
        steps = steps_override or STEPS[name]
        ratios, cpu_ratios, off_ms, on_ms = [], [], [], []
        for r in range(rounds):
            order = ("off", "micro") if r % 2 == 0 else ("micro", "off")  # rotate the position
            t = {m: _step_time(m, spec, steps) for m in order}
            ratios.append(t["micro"][0] / t["off"][0])
            cpu_ratios.append(t["micro"][1] / t["off"][1])
            off_ms.append(t["off"][0] * 1e3)
            on_ms.append(t["micro"][0] * 1e3)
        rows[name] = {
            "params": sum(p.numel() for p in _model(*spec).parameters()),
            "steps_per_run": steps,
            "step_ms_off": statistics.median(off_ms),
            "step_ms_micro": statistics.median(on_ms),
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
            "cpu_ratio_median": statistics.median(cpu_ratios),
            "cpu_ratios": cpu_ratios,
        }
    if rank == 0:
        out = {"world_size": int(os.environ["WORLD_SIZE"]), "backend": "gloo", "device": "cpu",
               "global_batch": BATCH, "rounds": rounds,
               "torch": torch.__version__, "target_ratio": 1.03, "commit": git_commit(),
               "load_average": os.getloadavg(), "models": rows}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=1))
        print(f"{'model':<12} {'params':>9} {'off ms':>8} {'micro ms':>9} {'ratio':>7} {'cpu ratio':>9}")
        for name, row in rows.items():
            print(f"{name:<12} {row['params']:>9,} {row['step_ms_off']:>8.2f} "
                  f"{row['step_ms_micro']:>9.2f} {row['ratio_median']:>7.3f} {row['cpu_ratio_median']:>9.3f}")
        print(f"target: <= 1.03x; written {RESULTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per fit for every model (default: per model, {STEPS})")
    args = p.parse_args()
    if "RANK" in os.environ:
        worker(args.rounds, args.steps)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "benchmarks.ddp_overhead", "--rounds", str(args.rounds)]
    cmd += ["--steps", str(args.steps)] if args.steps else []
    root = Path(__file__).resolve().parent.parent
    sys.exit(subprocess.call(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}))


if __name__ == "__main__":
    main()
