"""Page for ``adam_noise.json``: raw against preconditioned noise scale on charlm (AdamW)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, num, span, table, times

written_for = "8ea9700b7425"  # the commentary was checked against these results

TEMPLATE = """\
Adam steps along `g / (sqrt(v_hat) + eps)`, so the gradient noise that limits its useful
batch is that of the preconditioned gradients (AdaptDL/Pollux measure it there; Zhang et al.
2019 found Adam's critical batch larger than SGD's). This compares the two estimates on the
same backward passes of one run.

## Protocol

`charlm` ({chars:,} characters), AdamW at LR {lr:g}, global batch {batch} as {micro}
micro-batches, seed {seed}. Two collectors hook the same backward passes: the raw
`MicroBatchNormCollector` and `PreconditionedNormCollector` with `adam_preconditioner` (the previous
step's `1/(sqrt(v_hat)+eps)`), each feeding its own `GradientNoiseScale` (EMA decay
{smoothing}). Estimates read at the end of each epoch.

```bash
python -m benchmarks.adam_noise     # {wall:.0f} s in the recorded run
```

## Results

{table}

The preconditioned noise scale was {ratio_span} the raw one. The `budget` policy still
follows the raw estimate (fit does not yet choose the collector by optimizer), which
therefore understates how far Adam's batch could grow.
"""


def render(data: Any, source: Path) -> Page:
    rows = [[r["epoch"], num(r["step"]), f"{r['val_loss']:.3f}", num(r["raw_noise_scale"], 1),
             num(r["preconditioned_noise_scale"], 1), times(r["ratio"], 1)] for r in data["rows"]]
    ratio_span = span((r["ratio"] for r in data["rows"]), lambda x: times(x, 1))
    body = TEMPLATE.format(
        chars=data["chars"], lr=data["lr"], batch=data["batch_size"], micro=data["micro_batches"],
        seed=data["seed"], smoothing=data["smoothing"], wall=data["wall_s"], ratio_span=ratio_span,
        table=table(["epoch", "step", "val loss", "raw B_simple", "preconditioned B_simple", "ratio"],
                    rows, "rrrrrr"))
    summary = f"charlm AdamW: preconditioned noise scale {ratio_span} the raw one over {len(rows)} epochs"
    return Page("Adam: raw against preconditioned noise scale", summary, body, written_for)
