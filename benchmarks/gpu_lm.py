"""LM pretraining on one GPU, in wall-clock: fixed B at the memory probe's largest micro-batch,
fixed B0 tuned, and fit's default, to the best fixed run's loss (issue 28); at most 6 minutes.

The task is ``lm_pretrain``'s (:mod:`benchmarks._lm`: one pass over Python standard-library
source, split by file, AdamW, warm-up + cosine to 10% on fit's clock) with a model sized so that
small batches underuse a GPU: 6 layers x 384, 6 heads, context 256 (about 10.7M parameters), in
bf16 autocast. Arms, one seed:

1. ``fixed`` at B0 = :data:`B0` over a x2 grid of LRs (:data:`LRS`): the tuned fixed B0;
2. ``probe-max``: fixed B = the largest micro-batch ``autobatch.probe_memory`` allows on this
   GPU (what ``auto_find_batch_size``-style users get: the largest batch that fits), rounded
   down to a multiple of 8 and capped at a tenth of the pass, at the tuned LR scaled by the
   square-root rule ``sqrt(B / B0)``;
3. ``default``: ``autobatch.fit``'s defaults from B0 at the tuned LR;
4. ``schedule`` (if time is left): ``policy="schedule"`` from B0 at the tuned LR.

Target: the best fixed run's final held-out loss. Each arm's wall-clock (evaluations left
out), steps and tokens to first reach it are interpolated on its eval curve and divided by the
best fixed run's. An arm is skipped (and says so) when the time spent so far plus the
slowest run so far would pass ``--time-limit`` (default 330 s).

    python -m benchmarks.gpu_lm                                   # on a CUDA GPU, <= 6 min
    python -m benchmarks.gpu_lm --smoke-cpu --out /tmp/gpu_lm.json  # the same code, tiny, on CPU, seconds

It writes ``benchmarks/results/gpu_lm.json`` on a GPU; ``--smoke-cpu`` writes only to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root holds the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._lm import ModelSpec, lm_data, reach, run, sequence_loss, spec_dict

__all__ = ["GPU", "SMOKE", "Setup", "main", "summarise"]

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_lm.json"
B0 = 32
LRS = (1e-3, 2e-3, 4e-3)  # the fixed B0's grid (x2)
KEYS = ("step", "tokens", "wall_s")


@dataclass(frozen=True)
class Setup:
    chars: int
    context: int
    spec: ModelSpec
    b0: int
    lrs: tuple[float, ...]
    device: str
    precision: str
    fractions: tuple[float, ...]
    eval_windows: int
    held_out_every: int = 20
    probe_budget: str | None = None  # None: the device's free memory


GPU = Setup(chars=20_000_000, context=256, spec=ModelSpec(d_model=384, heads=6, layers=6), b0=B0, lrs=LRS,
            device="cuda", precision="bf16", fractions=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0),
            eval_windows=512)
SMOKE = Setup(chars=12_000, context=16, spec=ModelSpec(d_model=16, heads=2, layers=1), b0=8, lrs=(4e-3, 8e-3),
              device="cpu", precision="fp32", fractions=(0.5, 1.0), eval_windows=32, held_out_every=3,
              probe_budget="64MiB")


def probe_max(setup: Setup, examples: int) -> dict[str, Any]:
    """The largest micro-batch the memory probe allows for this model, optimizer and precision
    on the device, rounded down to a multiple of 8 and capped at a tenth of the examples."""
    from autobatch import probe_memory

    data = lm_data(setup.chars, setup.context, setup.eval_windows, setup.held_out_every)
    model = setup.spec.build(setup.context, 0).to(setup.device)
    t0 = time.perf_counter()
    found = probe_memory(model, (data.train_x[:4], data.train_y[:4]), sequence_loss,
                         optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.1, betas=(0.9, 0.95)),
                         device=setup.device, budget_bytes=setup.probe_budget, precision=setup.precision,
                         mode="estimate" if setup.device == "cpu" else "auto")
    b = max(setup.b0, min(examples // 10, found.max_micro_batch_size) // 8 * 8)
    del model
    return {"probed": found.max_micro_batch_size, "batch_size": b, "capped": b < found.max_micro_batch_size,
            "mode": found.mode, "probe_s": round(time.perf_counter() - t0, 2)}


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The best fixed run (lowest final loss among ``fixed`` arms) sets the target; every arm's
    figures at the target over the best fixed run's at its end."""
    fixed = {k: r for k, r in rows.items() if k.startswith("fixed") and r["final_loss"] is not None}
    if not fixed:
        return {}
    best = min(fixed, key=lambda k: fixed[k]["final_loss"])
    ref = {"step": fixed[best]["steps"], "tokens": fixed[best]["tokens"], "wall_s": fixed[best]["wall_s"]}
    target = fixed[best]["final_loss"]
    out: dict[str, Any] = {"best_fixed": best, "target_loss": target, "reference": ref, "arms": {}}
    for name, r in rows.items():
        hit = reach(r["curve"], target) if r["final_loss"] is not None else None
        out["arms"][name] = {
            "b0": r["b0"], "lr": r["lr"], "max_batch_size": r["max_batch_size"], "final_loss": r["final_loss"],
            "final_vs_target": None if r["final_loss"] is None else r["final_loss"] / target - 1,
            "steps": r["steps"], "tokens": r["tokens"], "wall_s": r["wall_s"],
            "reached": hit, "ratios": None if hit is None else {k: hit[k] / ref[k] for k in KEYS},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke-cpu", action="store_true", help="a tiny version on CPU, in seconds; needs --out")
    p.add_argument("--out", type=Path, default=None, help=f"results file (default on a GPU: {RESULTS})")
    p.add_argument("--time-limit", type=float, default=330.0, help="seconds; arms that would pass it are skipped")
    args = p.parse_args(argv)
    if args.smoke_cpu and args.out is None:
        p.error("--smoke-cpu writes tiny-size results: give --out PATH (never the benchmark's results file)")
    if not args.smoke_cpu and not torch.cuda.is_available():
        print("gpu_lm needs a CUDA GPU (torch.cuda.is_available() is False here); --smoke-cpu runs its code on CPU")
        return 0
    setup = SMOKE if args.smoke_cpu else GPU
    if setup.device == "cpu":
        torch.set_num_threads(1)
    start = time.perf_counter()
    data = lm_data(setup.chars, setup.context, setup.eval_windows, setup.held_out_every)
    device_name = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu (smoke)"
    report: dict[str, Any] = {
        "device": device_name, "torch": torch.__version__, "python": platform.python_version(),
        "precision": setup.precision, "task": {**data.describe(), "model": spec_dict(setup.spec, setup.context),
                                              "optimizer": "AdamW, weight_decay 0.1, betas 0.9/0.95",
                                              "schedule": "warm-up 5% of the examples, cosine to 10% of the peak"},
        "b0": setup.b0, "lrs": list(setup.lrs), "time_limit_s": args.time_limit, "runs": {}, "skipped": [],
    }
    kw = {"seed": 0, "schedule": "cosine", "fractions": setup.fractions, "device": setup.device,
          "precision": setup.precision}
    slowest = 0.0

    def arm(name: str, b0: int, lr: float, overrides: dict[str, Any]) -> None:
        nonlocal slowest
        spent = time.perf_counter() - start
        if spent + slowest > args.time_limit:
            report["skipped"].append({"arm": name, "why": f"{spent:.0f} s spent + {slowest:.0f} s for a run > the limit"})
            print(f"{name}: skipped (time)", flush=True)
            return
        t0 = time.perf_counter()
        row = run(data, setup.spec, b0=b0, lr=lr, overrides=overrides, **kw)
        slowest = max(slowest, time.perf_counter() - t0)
        report["runs"][name] = row
        print(f"{name:16s} B0={b0:<5d} lr={lr:<8.3g} loss={row['final_loss']} steps={row['steps']} "
              f"maxB={row['max_batch_size']} wall={row['wall_s']}s", flush=True)

    fixed = {"policy": "fixed", "gns_method": "off", "lr_scaling": "none"}
    for lr in setup.lrs:
        arm(f"fixed lr={lr:g}", setup.b0, lr, fixed)
    done = {k: r for k, r in report["runs"].items() if r["final_loss"] is not None}
    if not done:
        print("no fixed run finished: nothing to compare against")
        return 1
    tuned = min(done.values(), key=lambda r: r["final_loss"])["lr"]
    report["tuned_lr"] = tuned
    report["probe"] = probe = probe_max(setup, data.examples)
    big = probe["batch_size"]
    arm("default", setup.b0, tuned, {})
    arm(f"probe-max B={big}", big, tuned * math.sqrt(big / setup.b0), fixed)
    arm("schedule", setup.b0, tuned, {"policy": "schedule"})
    report["summary"] = summarise(report["runs"])
    report["total_s"] = round(time.perf_counter() - start, 1)
    out = args.out or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for name, a in report["summary"].get("arms", {}).items():
        r = a["ratios"]
        print(f"{name:16s} loss {a['final_loss']} to target: "
              + ("not reached" if r is None else f"wall {r['wall_s']:.2f}x steps {r['step']:.2f}x tokens {r['tokens']:.2f}x"))
    print(f"total {report['total_s']} s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
