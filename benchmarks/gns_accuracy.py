"""Accuracy of measure_noise_scale against the exact B_simple, as B_simple/B grows.

For each problem of autobatch/testing.py (a whole 16,384-example data set, fixed parameters),
the exact population B_simple comes from every example's gradient (torch.func). Then, for
batch sizes B = B_simple / ratio, measure_noise_scale runs ``--batches`` batches per repeat
with both methods ("micro": about 8 micro-batches per batch; "per_example": b = 1), over
``--repeats`` seeds. Reported per (problem, method, ratio): the mean relative error (bias),
its spread over repeats (standard deviation), and the worst repeat.

    python benchmarks/gns_accuracy.py            # about 2 minutes on 1 CPU thread
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from autobatch import measure_noise_scale
from autobatch.testing import EXACT_CASES, exact_noise_scale

SETTLE = {"logistic": 0, "mlp": 0, "cnn": 0, "sequence": 20}  # as in tests/noise/test_measure.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gns_accuracy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    start = time.perf_counter()
    print(f"{'problem':9s} {'method':12s} {'B_simple':>8s} {'B':>4s} {'ratio':>6s} {'bias':>7s} {'spread':>7s} {'worst':>7s}")
    for name, build in EXACT_CASES.items():
        problem = build(n=args.n, steps=SETTLE[name])
        exact = exact_noise_scale(problem)
        for ratio in args.ratios:
            batch = max(2, round(exact.noise_scale / ratio))
            if batch >= 16:  # a multiple of 8, so that "micro" has 8 micro-batches
                batch = 8 * round(batch / 8)
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
