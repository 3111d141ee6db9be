"""Memory probe vs the doubling-then-bisection search most trainers use.

For each model and simulated CPU budget, three ways to find the largest micro-batch whose
training step fits:

- ``probe``: ``autobatch.probe_memory(mode="real", margin=0)``: fake-tensor estimate, then
  real steps to confirm (backing off after an OOM).
- ``baseline``: double the batch from 2 until a real step runs out of memory, then bisect
  between the last success and the first failure down to one example (Lightning's
  BatchSizeFinder in "binsearch" mode). Each trial runs the same two-step workload as the
  probe, since a single step misses the optimizer state created in the first.
- ``truth``: the largest size whose real steps succeed, i.e. the baseline's answer,
  checked by running it and the size above it once more.

The OOM signal for real steps is ``autobatch.memory.oom.MemoryBudget(budget)`` (live storage bytes
of the step, as a full device would fail). As an independent check, the found size's peak is
also counted from the torch profiler's CPU allocator events (``profiler peak``).

Wall times alternate probe and baseline ``--repeats`` times and report medians. The one-time
cost of importing the fake-tensor machinery (torch._dynamo, paid by the first probe of a
process) is measured once and reported apart.

Run: ``python benchmarks/probe.py`` (writes benchmarks/results/probe.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from autobatch import probe_memory
from autobatch.memory.oom import MemoryBudget, is_oom_error, release_after_oom

MiB = 2**20
CAP = 16_384  # the largest batch either search may return


class CNN(nn.Module):
    """A MNIST-1D-shaped CNN with BatchNorm (inputs (B, 1, 40))."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 10, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CharTransformer(nn.Module):
    """A 2-layer character transformer (inputs (B, 64) token ids)."""

    def __init__(self, vocab: int = 96, d: int = 128, context: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(x) + self.pos[: x.shape[1]]))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


# name -> (model factory, batch of size b, loss, optimizer factory, budgets in MiB)
MODELS = {
    "mlp_adam": (lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                                       nn.ReLU(), nn.Linear(512, 10)),
                 lambda b: (torch.randn(b, 784), torch.randint(0, 10, (b,))),
                 nn.functional.cross_entropy, torch.optim.Adam, (16, 64)),
    "cnn_bn_sgd": (CNN, lambda b: (torch.randn(b, 1, 40), torch.randint(0, 10, (b,))),
                   nn.functional.cross_entropy, _sgd, (16, 64)),
    "transformer_adam": (CharTransformer,
                         lambda b: (torch.randint(0, 96, (b, 64)), torch.randint(0, 96, (b, 64))),
                         lm_loss, torch.optim.Adam, (32, 128)),
}


def two_steps(model, batch, loss_fn, optimizer, counter: list[int]) -> None:
    """The workload the probe measures: two optimizer steps, gradients zeroed at the end."""
    for _ in range(2):
        counter[0] += 1
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        del loss
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fits(model, make_batch, loss_fn, make_opt, b: int, budget: int, counter: list[int]) -> bool:
    """Run the workload at ``b`` under the budget; True if it did not run out of memory."""
    optimizer = make_opt(model.parameters())
    batch = make_batch(b)
    oom = False
    try:
        with MemoryBudget(budget, baseline=(model, batch)):
            two_steps(model, batch, loss_fn, optimizer, counter)
    except Exception as exc:  # only OOMs are expected
        if not is_oom_error(exc):
            raise
        oom = True
    del optimizer, batch
    if oom:
        release_after_oom(model)
    return not oom


def doubling_then_bisection(model, make_batch, loss_fn, make_opt, budget: int):
    """Lightning's 'binsearch': double from 2 until OOM, then bisect to a single example."""
    counter = [0]
    lo, b = 0, 2
    while b <= CAP and fits(model, make_batch, loss_fn, make_opt, b, budget, counter):
        lo, b = b, b * 2
    if b > CAP:
        return lo, counter[0]
    if lo == 0:  # 2 failed: try 1
        return (1 if fits(model, make_batch, loss_fn, make_opt, 1, budget, counter) else 0), \
            counter[0]
    hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(model, make_batch, loss_fn, make_opt, mid, budget, counter):
            lo = mid
        else:
            hi = mid
    return lo, counter[0]


def profiler_peak(model, batch, loss_fn, make_opt) -> int:
    """Peak bytes of the workload from the profiler's allocator events (independent count)."""
    model = copy.deepcopy(model)
    optimizer = make_opt(model.parameters())
    live0 = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for t in (*model.parameters(), *model.buffers(), *batch)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        two_steps(model, batch, loss_fn, optimizer, [0])
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return sum(live0.values()) + peak


def run(repeats: int) -> dict:
    load_start = os.getloadavg()[0]  # the CPU is shared: say how busy it was
    t = time.perf_counter()
    from torch._subclasses.fake_tensor import FakeTensorMode

    FakeTensorMode()  # imports torch._dynamo once per process
    import_s = time.perf_counter() - t
    rows = []
    for name, (make_model, make_batch, loss_fn, make_opt, budgets) in MODELS.items():
        torch.manual_seed(0)
        model = make_model().train()
        for budget_mib in budgets:
            budget = budget_mib * MiB
            probe_times, base_times, probes, bases = [], [], [], []
            for _ in range(repeats):  # alternate the two searches; medians below
                probe = probe_memory(model, make_batch(8), loss_fn, make_opt, budget_bytes=budget,
                                     max_batch_size=CAP, margin=0, mode="real")
                probe_times.append(probe.wall_time_s)
                probes.append(probe)
                t = time.perf_counter()
                bases.append(doubling_then_bisection(model, make_batch, loss_fn, make_opt, budget))
                base_times.append(time.perf_counter() - t)
            probe, (base_b, base_steps) = probes[0], bases[0]
            assert all(p.max_micro_batch_size == probe.max_micro_batch_size for p in probes)
            assert all(b == bases[0] for b in bases)
            truth = base_b
            check = [0]
            truth_ok = fits(model, make_batch, loss_fn, make_opt, truth, budget, check) and (
                truth == CAP or not fits(model, make_batch, loss_fn, make_opt, truth + 1, budget,
                                         check))
            indep = profiler_peak(model, make_batch(probe.max_micro_batch_size), loss_fn, make_opt)
            rows.append({
                "model": name,
                "budget_mib": budget_mib,
                "true_max": truth,
                "truth_checked": truth_ok,
                "probe_found": probe.max_micro_batch_size,
                "probe_fraction_of_true": probe.max_micro_batch_size / truth,
                "probe_real_steps": probe.real_steps,
                "probe_fake_evaluations": len(probe.estimated),
                "probe_wall_s_median": statistics.median(probe_times),
                "probe_estimated_peak_mib": probe.estimated.get(probe.max_micro_batch_size, 0) / MiB,
                "probe_profiler_peak_mib": indep / MiB,
                "profiler_peak_within_budget": indep <= budget,
                "baseline_found": base_b,
                "baseline_real_steps": base_steps,
                "baseline_wall_s_median": statistics.median(base_times),
            })
            print_row(rows[-1])
    return {
        "benchmark": "probe",
        "command": "python benchmarks/probe.py" + (f" --repeats {repeats}" if repeats != 3 else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "cap": CAP,
        "one_time_fake_tensor_import_s": import_s,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0],
                              "cores": os.cpu_count()},
        "rows": rows,
    }


HEADER = (f"{'model':<17} {'budget':>7} {'true max':>8} {'probe':>6} {'of true':>7} "
          f"{'steps':>5} {'time s':>6} {'profiler MiB':>12} | {'baseline':>8} {'steps':>5} "
          f"{'time s':>6}")


def print_row(r: dict) -> None:
    print(f"{r['model']:<17} {r['budget_mib']:>4}MiB {r['true_max']:>8} {r['probe_found']:>6} "
          f"{r['probe_fraction_of_true']:>7.1%} {r['probe_real_steps']:>5} "
          f"{r['probe_wall_s_median']:>6.2f} {r['probe_profiler_peak_mib']:>12.2f} | "
          f"{r['baseline_found']:>8} {r['baseline_real_steps']:>5} "
          f"{r['baseline_wall_s_median']:>6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(HEADER, flush=True)
    result = run(args.repeats)
    ok = all(r["truth_checked"] and r["probe_found"] <= r["true_max"]
             and r["probe_fraction_of_true"] >= 0.97 and r["probe_real_steps"] <= 2
             and r["probe_wall_s_median"] < 5 for r in result["rows"])
    result["targets_met"] = ok
    load = result["load_average_1min"]
    print(f"load average {load['start']:.1f} -> {load['end']:.1f} on {load['cores']} cores; "
          f"one-time fake-tensor import: {result['one_time_fake_tensor_import_s']:.2f} s; "
          f"targets (>= 97% of true max, never above, <= 2 real steps, < 5 s): "
          f"{'met' if ok else 'NOT met'}")
    over = [f"{r['model']}@{r['budget_mib']}MiB" for r in result["rows"]
            if not r["profiler_peak_within_budget"]]
    if over:
        print("allocator-level peak (profiler) above the budget at the found size: "
              + ", ".join(over) + " (kernel scratch no storage count sees, e.g. oneDNN conv)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
