"""Accuracy of measure_noise_scale against the exact B_simple, as B_simple/B grows.

For each problem of autobatch/testing.py (a whole 16,384-example data set, fixed parameters),
the exact population B_simple comes from every example's gradient (torch.func). Then, for
batch sizes B = B_simple / ratio, measure_noise_scale runs ``--batches`` batches per repeat
with both methods ("micro": about 8 micro-batches per batch; "per_example": b = 1), over
``--repeats`` seeds. Reported per (problem, method, ratio): the mean relative error (bias),
its spread over repeats (standard deviation), and the worst repeat.

    python benchmarks/gns_accuracy.py            # about 2 minutes on 1 CPU thread

Calibration (``--calibration``, written under the key ``calibration`` of the same JSON, the
accuracy rows kept): how often the estimator's intervals at ``z`` standard errors cover the
exact values, over ``--seeds`` seeds per (problem, B_simple/B). Each problem's per-example
gradients are computed once (torch.func); a micro-batch's gradient of a mean-reduced loss is
the mean of its examples' gradients, so each step's norms are formed from them with the same
arithmetic as fit's micro method (tests/train/test_loop.py compares fit's in-loop estimate with
the exact value), at fixed parameters. Batches follow fit's sample order
(:class:`autobatch.train.sampler.SampleStream`: a seeded permutation per epoch, the last step
of an epoch shorter). Three ways of driving the estimator, fed the same steps (``SCHEMES``):

- ``split``: fit with every step in k micro-batches (k as measure_noise_scale's default micro
  size gives, about 8), EMA decay 0.95 (fit's ``gns_smoothing``), nominal batch sizes;
- ``unsplit``: fit with steps of one micro-batch: split in two on the first 20 steps and every
  8th after (fit's ``gns_every``), the whole step's norm on the others (``update_big``), 0.95;
- ``mean``: every step in k micro-batches, equal weights (``smoothing=None``) and the effective
  batch sizes of sampling without replacement, as ``measure_noise_scale`` does.

Read after ``READ_AT`` steps, at z = 1 and 2: the coverage of the box interval the gns policy
uses (``noise_scale_interval`` with the standard errors' degrees of freedom), of the component
intervals ``|G|^2 +- w se`` and ``tr(Sigma) +- w se`` it is built from (``w = student_width(z,
dof)``), of the same three at the plain ``z``, and of the delta-method ``noise_scale +- z se``.

    python benchmarks/gns_accuracy.py --calibration   # about 10 minutes on 1 CPU thread
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autobatch import measure_noise_scale
from autobatch.noise import GradientNoiseScale
from autobatch.noise._effective_batch import harmonic_batch_size, without_replacement_batch_size
from autobatch.noise.estimator import noise_scale_interval, student_width
from autobatch.testing import EXACT_CASES, Exact, exact_noise_scale, per_example_grads
from autobatch.train.sampler import SampleStream, split_sizes

SETTLE = {"logistic": 0, "mlp": 0, "cnn": 0, "sequence": 20}  # as in tests/noise/test_measure.py

# -- calibration -------------------------------------------------------------------------------
SCHEMES = ("split", "unsplit", "mean")
READ_AT = (20, 100, 500)
ZS = (1.0, 2.0)
SMOOTHING = 0.95  # fit's gns_smoothing
FIRST = round(1 / (1 - SMOOTHING))  # fit measures each of the estimator's first 1/(1-beta) steps...
EVERY = 8  # ...then every gns_every-th step of one micro-batch
SEED_STRIDE = 10_000  # more epochs than any run takes


def batch_for(noise_scale: float, ratio: float) -> int:
    """The batch B = B_simple / ratio, a multiple of 8 from 16 up (so that "micro" has 8
    micro-batches), at least 2."""
    batch = max(2, round(noise_scale / ratio))
    return 8 * round(batch / 8) if batch >= 16 else batch


def micro_parts(batch: int) -> int:
    """Micro-batches per step: ``batch`` over measure_noise_scale's default micro-batch size
    (the largest divisor of ``batch`` up to ``batch // 8``)."""
    target = max(1, batch // 8)
    return batch // max(d for d in range(1, target + 1) if batch % d == 0)


def step_norms(rows: torch.Tensor, parts: int) -> tuple[list[int], list[float], float]:
    """One step's inputs to the estimator from its examples' gradients (one row each): the
    micro-batch sizes (``split_sizes``, as fit splits a step), the squared norms of the
    micro-batch gradients of a mean-reduced loss (the mean of their rows) and that of the
    whole step's gradient."""
    sizes = split_sizes(rows.shape[0], parts)
    sums = torch.stack([chunk.sum(0) for chunk in rows.split(sizes)])
    small = (sums / torch.tensor(sizes, dtype=sums.dtype).unsqueeze(1)).square().sum(1)
    big = float((sums.sum(0) / rows.shape[0]).square().sum())
    return sizes, small.tolist(), big


def reading(est: GradientNoiseScale) -> dict[str, float]:
    """What an interval needs from the estimator, read now."""
    return {"grad_sq": est.grad_sq_mean, "grad_sq_se": est.grad_sq_stderr, "grad_sq_dof": est.grad_sq_dof,
            "trace_cov": est.trace_cov, "trace_cov_se": est.trace_cov_stderr, "trace_cov_dof": est.trace_cov_dof,
            "noise_scale": est.noise_scale, "noise_scale_se": est.noise_scale_stderr}


def calibration_run(grads: torch.Tensor, batch: int, parts: int, seed: int,
                    read_at: Sequence[int] = READ_AT) -> dict[str, list[dict[str, float]]]:
    """Drive one estimator per scheme of ``SCHEMES`` with the same ``max(read_at)`` steps of
    ``batch`` examples (fit's sample order, seeded by ``seed``) from the per-example gradients
    ``grads`` (one row per example of the data set); the readings after each of ``read_at``
    steps, per scheme."""
    n = grads.shape[0]
    # fit's order of epoch e is the permutation seeded by seed + e: spaced seeds share none.
    stream = SampleStream(n, seed=SEED_STRIDE * seed)
    ests = {"split": GradientNoiseScale(SMOOTHING, min_updates=1),
            "unsplit": GradientNoiseScale(SMOOTHING, min_updates=1),
            "mean": GradientNoiseScale(None, min_updates=1)}
    readings: dict[str, list[dict[str, float]]] = {k: [] for k in ests}
    for done in range(max(read_at)):
        step = done + 1
        rows = grads[stream.take(batch)]
        m = rows.shape[0]
        sizes, small, big = step_norms(rows, parts)
        ests["split"].update(small, harmonic_batch_size(sizes), big, m, step=step)
        effective = [without_replacement_batch_size(b, n) for b in sizes]
        ests["mean"].update(small, harmonic_batch_size(effective), big, without_replacement_batch_size(m, n))
        if done < FIRST or done % EVERY == 0:
            halves, half_norms, _ = step_norms(rows, 2)
            ests["unsplit"].update(half_norms, harmonic_batch_size(halves), big, m, step=step)
        else:
            ests["unsplit"].update_big(big, m, step=step)
        if step in read_at:
            for k, est in ests.items():
                readings[k].append(reading(est))
    return readings


def _inside(value: float, half_width: float, exact: float) -> bool:
    """Whether ``value +- half_width`` holds ``exact`` (an infinite or NaN width holds everything)."""
    return not math.isfinite(half_width) or abs(value - exact) <= half_width


def coverage(readings: Sequence[dict[str, float]], exact: Exact, zs: Sequence[float] = ZS) -> dict[str, Any]:
    """How often each interval holds the exact value, over ``readings`` (one per seed), per z.

    ``grad_sq`` and ``trace_cov``: ``value +- w se``, ``w = student_width(z, dof)`` (the width
    ``noise_scale_interval`` gives each average); ``box``: ``noise_scale_interval`` with the
    degrees of freedom (the gns policy's interval); ``grad_sq_z``, ``trace_cov_z``, ``box_z``: the
    same at the plain ``z`` (no small-sample widening); ``delta``: ``noise_scale +- z
    noise_scale_se``. Also the box's median bounds relative to the exact B_simple (``low``,
    ``high``; None for an infinite median)."""
    out: dict[str, Any] = {"seeds": len(readings)}
    for z in zs:
        hits = dict.fromkeys(("grad_sq", "trace_cov", "box", "grad_sq_z", "trace_cov_z", "box_z", "delta"), 0)
        lows, highs = [], []
        for r in readings:
            for k, value in (("grad_sq", exact.grad_sq), ("trace_cov", exact.trace_cov)):
                hits[k] += _inside(r[k], student_width(z, r[f"{k}_dof"]) * r[f"{k}_se"], value)
                hits[f"{k}_z"] += _inside(r[k], z * r[f"{k}_se"], value)
            hits["delta"] += _inside(r["noise_scale"], z * r["noise_scale_se"], exact.noise_scale)
            args = (r["grad_sq"], r["trace_cov"], r["grad_sq_se"], r["trace_cov_se"], z)
            low, high = noise_scale_interval(*args, grad_sq_dof=r["grad_sq_dof"], trace_cov_dof=r["trace_cov_dof"])
            hits["box"] += low <= exact.noise_scale <= high
            low_z, high_z = noise_scale_interval(*args)
            hits["box_z"] += low_z <= exact.noise_scale <= high_z
            lows.append(low / exact.noise_scale)
            highs.append(high / exact.noise_scale)
        high = statistics.median(highs)
        out[f"z{z:g}"] = {**{k: v / len(readings) for k, v in hits.items()},
                          "low": statistics.median(lows), "high": high if math.isfinite(high) else None}
    return out


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration phase: per problem and ratio, ``args.seeds`` runs of ``calibration_run``,
    their coverage per scheme and reading step."""
    rows = []
    start = time.perf_counter()
    print(f"{'problem':9s} {'B':>4s} {'ratio':>6s} {'scheme':8s} {'step':>5s}  z=1: {'|G|^2':>5s} {'trS':>5s} "
          f"{'box':>5s} {'box_z':>5s}   z=2: {'box':>5s}")
    for name, build in EXACT_CASES.items():
        problem = build(n=args.n, steps=SETTLE[name])
        exact = exact_noise_scale(problem)
        grads = torch.cat([per_example_grads(problem.model, problem.x[i : i + 1024], problem.y[i : i + 1024],
                                             problem.loss_fn).double() for i in range(0, args.n, 1024)])
        for ratio in args.ratios:
            batch = batch_for(exact.noise_scale, ratio)
            parts = micro_parts(batch)
            runs = [calibration_run(grads, batch, parts, seed) for seed in range(args.seeds)]
            for scheme in SCHEMES:
                for i, step in enumerate(READ_AT):
                    cov = coverage([run[scheme][i] for run in runs], exact)
                    rows.append({"problem": name, "exact_noise_scale": exact.noise_scale, "batch_size": batch,
                                 "ratio": exact.noise_scale / batch, "micro_batches": parts, "scheme": scheme,
                                 "step": step, **cov})
                    z1, z2 = cov["z1"], cov["z2"]
                    print(f"{name:9s} {batch:4d} {exact.noise_scale / batch:6.2f} {scheme:8s} {step:5d}  "
                          f"     {z1['grad_sq']:5.2f} {z1['trace_cov']:5.2f} {z1['box']:5.2f} {z1['box_z']:5.2f}"
                          f"        {z2['box']:5.2f}", flush=True)
    meta = {"n": args.n, "seeds": args.seeds, "read_at": list(READ_AT), "smoothing": SMOOTHING, "first": FIRST,
            "every": EVERY, "zs": list(ZS), "threads": 1, "seconds": time.perf_counter() - start,
            "torch": torch.__version__}
    return {"meta": meta, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--calibration", action="store_true",
                        help="run the calibration phase only; the accuracy rows already written are kept")
    parser.add_argument("--seeds", type=int, default=100, help="seeds per calibration row")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gns_accuracy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.calibration:
        previous["calibration"] = calibrate(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(previous, indent=1))
        print(f"wrote {out} ({previous['calibration']['meta']['seconds']:.0f} s)")
        return
    rows = []
    start = time.perf_counter()
    print(f"{'problem':9s} {'method':12s} {'B_simple':>8s} {'B':>4s} {'ratio':>6s} {'bias':>7s} {'spread':>7s} {'worst':>7s}")
    for name, build in EXACT_CASES.items():
        problem = build(n=args.n, steps=SETTLE[name])
        exact = exact_noise_scale(problem)
        for ratio in args.ratios:
            batch = batch_for(exact.noise_scale, ratio)
            batches = min(args.batches, args.n // batch)
            for method in ("micro", "per_example"):
                errors = []
                for seed in range(args.repeats):
                    est = measure_noise_scale(
                        problem.model, (problem.x, problem.y), problem.loss_fn,
                        batch_size=batch, num_batches=batches, method=method, seed=seed,
                    )
                    errors.append(est.noise_scale / exact.noise_scale - 1.0)
                row = {
                    "problem": name,
                    "method": method,
                    "exact_noise_scale": exact.noise_scale,
                    "batch_size": batch,
                    "ratio": exact.noise_scale / batch,
                    "num_batches": batches,
                    "micro_batch_size": est.micro_batch_size,
                    "bias": statistics.fmean(errors),
                    "spread": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                    "worst": max(errors, key=abs),
                    "errors": errors,
                }
                rows.append(row)
                print(
                    f"{name:9s} {method:12s} {exact.noise_scale:8.1f} {batch:4d} {row['ratio']:6.2f} "
                    f"{row['bias']:+7.3f} {row['spread']:7.3f} {row['worst']:+7.3f}"
                )
    elapsed = time.perf_counter() - start
    meta = {"n": args.n, "repeats": args.repeats, "batches": args.batches, "threads": 1, "seconds": elapsed,
            "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = {"calibration": previous["calibration"]} if "calibration" in previous else {}
    out.write_text(json.dumps({"meta": meta, "rows": rows, **kept}, indent=1))
    print(f"wrote {args.out} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
