"""Training-step time with the noise-scale estimator over time without it, side by side.

For an MLP, a CNN and a small transformer, one optimizer step (SGD, batch B) is timed in
these variants, each alternated round by round with its baseline in one process (the order
rotates each round):

- ``plain_k``: k micro-batches of B/k accumulated, no estimator (baseline of ``micro``);
- ``control``: ``plain_k`` again, timed as a variant: its ratio (ideally 1) shows the noise
  and the position effects of the harness;
- ``micro``: the same with MicroBatchNormCollector and GradientNoiseScale.update;
- ``plain_1``: one backward over B, no estimator (baseline of the two below);
- ``per_example``: the same with PerExampleNormCollector (+ the big norm and the update);
- ``vmap``: per-example gradients by torch.func.vmap(grad), their norms, their mean as the
  step's gradient.

Times are the CPU time of the (single) compute thread, which other jobs on a shared machine
do not inflate. Each ratio is the median over rounds of (variant time / its baseline's time
in the same round).

    python benchmarks/gns_overhead.py            # about 2 minutes on 1 CPU thread
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from autobatch.noise import (
    GradientNoiseScale,
    MicroBatchNormCollector,
    PerExampleNormCollector,
)
from autobatch.noise.micro_batch import grad_sq_norm
from autobatch.testing import TinyTransformer


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]]:
    torch.manual_seed(0)
    b = 128
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    cnn = nn.Sequential(  # the MNIST-1D CNN of docs/design/benchmarking.md
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 10, 10),
    )
    transformer = TinyTransformer(vocab=64, width=64, length=32)
    return {
        "mlp": (mlp, torch.randn(b, 784), torch.randint(10, (b,)), F.cross_entropy),
        "cnn": (cnn, torch.randn(b, 1, 40), torch.randint(10, (b,)), F.cross_entropy),
        "transformer": (transformer, torch.randint(64, (64, 32)), torch.randint(64, (64, 32)), _token_ce),
    }


def _variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, k: int):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    big = x.shape[0]
    xs, ys = x.chunk(k), y.chunk(k)
    gns = GradientNoiseScale()
    micro_hooks = MicroBatchNormCollector(model)
    micro_hooks.remove()  # re-attached only while its variant runs (hooks cost even when idle)
    state = {"micro": None, "per_example": None}

    def plain_k() -> None:
        opt.zero_grad(set_to_none=True)
        for xi, yi in zip(xs, ys):
            (loss_fn(model(xi), yi) * (len(xi) / big)).backward()
        opt.step()

    def micro() -> None:
        collector = state["micro"]
        opt.zero_grad(set_to_none=True)
        collector.begin_step()
        for xi, yi in zip(xs, ys):
            (loss_fn(model(xi), yi) * (len(xi) / big)).backward()
            collector.after_backward(batch_size=len(xi), loss_weight=len(xi) / big)
        n = collector.end_step()
        gns.update(n.small_sq_norms, n.small_batch_size, n.big_sq_norm, n.big_batch_size)
        opt.step()

    def plain_1() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def per_example() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        smalls = state["per_example"].sq_norms()
        gns.update(smalls.double().cpu().tolist(), 1, float(grad_sq_norm(params)), big)
        opt.step()

    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_example_grads = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def vmap_step() -> None:
        opt.zero_grad(set_to_none=True)
        grads = per_example_grads({n: p.detach() for n, p in zip(names, params)}, x, y)
        sq = sum(g.reshape(big, -1).square().sum(1) for g in grads.values())
        for n, p in zip(names, params):
            p.grad = grads[n].mean(0)
        gns.update(sq.double().tolist(), 1, float(grad_sq_norm(params)), big)
        opt.step()

    def attach(name: str) -> None:
        if name == "micro":
            state["micro"] = MicroBatchNormCollector(model)
        if name == "per_example":
            state["per_example"] = PerExampleNormCollector(model)

    def detach(name: str) -> None:
        if state.get(name) is not None:
            state[name].remove()
            state[name] = None

    variants = {
        "plain_k": plain_k,
        "control": plain_k,
        "micro": micro,
        "plain_1": plain_1,
        "per_example": per_example,
        "vmap": vmap_step,
    }
    return variants, attach, detach


GROUPS = [("plain_k", "control", "micro"), ("plain_1", "per_example"), ("plain_1", "vmap")]


def _alternate(group, variants, attach, detach, rounds: int) -> dict[str, list[float]]:
    """Time the group's variants in turn, the order rotating each round, after 2 warm-ups."""
    times: dict[str, list[float]] = {v: [] for v in group}
    order = list(group)
    for r in range(rounds + 2):
        order = order[1:] + order[:1]
        for v in order:
            attach(v)
            # CPU time of this thread (torch runs on it with 1 thread): other jobs on the
            # shared machine do not count, unlike wall-clock time.
            t0 = time.thread_time()
            variants[v]()
            elapsed = time.thread_time() - t0
            detach(v)
            if r >= 2:
                times[v].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gns_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    start = time.perf_counter()
    print(
        f"{'model':12s} {'params':>8s} {'B':>4s} {'plain_k ms':>10s} {'control':>8s} {'micro':>7s} "
        f"{'plain_1 ms':>10s} {'per_ex':>7s} {'vmap':>7s}"
    )
    for name, (model, x, y, loss_fn) in _cases().items():
        variants, attach, detach = _variants(model, x, y, loss_fn, args.micro_batches)
        times: dict[str, list[float]] = {}
        ratios: dict[str, float] = {}
        # Each variant is alternated only with its own baseline: a neighbour that allocates a
        # lot (vmap's B x P gradients) slows whatever runs next, which would bias the ratios.
        for group in GROUPS:
            group_times = _alternate(group, variants, attach, detach, args.rounds)
            for v in group[1:]:
                ratios[v] = statistics.median(t / b for t, b in zip(group_times[v], group_times[group[0]]))
            times.update(group_times)
        medians = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        results[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "batch_size": int(x.shape[0]),
            "micro_batches": args.micro_batches,
            "median_ms": medians,
            "ratio": ratios,
        }
        print(
            f"{name:12s} {results[name]['params']:8d} {x.shape[0]:4d} {medians['plain_k']:10.2f} {ratios['control']:7.3f}x "
            f"{ratios['micro']:6.3f}x {medians['plain_1']:10.2f} {ratios['per_example']:6.3f}x {ratios['vmap']:6.2f}x"
        )
    meta = {"rounds": args.rounds, "threads": 1, "torch": torch.__version__, "seconds": time.perf_counter() - start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "models": results}, indent=1))
    print(f"wrote {args.out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
