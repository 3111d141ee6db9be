"""Values for ``pages/adam_noise.md`` from ``adam_noise.json``: raw against preconditioned noise
scale on charlm (AdamW)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import num, span, table, times


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the per-epoch table, the ratio's span."""
    rows = [[r["epoch"], num(r["step"]), f"{r['val_loss']:.3f}", num(r["raw_noise_scale"], 1),
             num(r["preconditioned_noise_scale"], 1), times(r["ratio"], 1)] for r in data["rows"]]
    return {
        "chars": data["chars"], "lr": data["lr"], "batch": data["batch_size"], "micro": data["micro_batches"],
        "seed": data["seed"], "smoothing": data["smoothing"], "wall": data["wall_s"],
        "ratio_span": span((r["ratio"] for r in data["rows"]), lambda x: times(x, 1)),
        "epochs": len(rows),
        "table": table(["epoch", "step", "val loss", "raw B_simple", "preconditioned B_simple", "ratio"],
                       rows, "rrrrrr"),
    }
