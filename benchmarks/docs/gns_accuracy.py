"""Values for ``pages/gns_accuracy.md`` from ``gns_accuracy.json``: ``measure_noise_scale``
against the exact B_simple."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, pct, span, table

# The page reads the rows in three bands of B_simple/B: up to LOW, about MID, and above.
LOW, MID = 2, 4


def _band(ratio: float) -> float:
    """The nominal ratio a measured B_simple/B belongs to (B is rounded to whole examples)."""
    return 2 ** round(math.log2(ratio))


def _cell(r: dict[str, Any] | None) -> str:
    """``bias / spread / worst`` of one method's row, ``-`` where the method did not run."""
    return "-" if r is None else f"{pct(r['bias'])} / {pct(r['spread'], signed=False)} / {pct(r['worst'])}"


def _worst_abs(sel: list[dict[str, Any]], key: str) -> str:
    """The largest ``|key|`` over the rows, as a percentage; ``-`` for no row."""
    return pct(max(abs(r[key]) for r in sel), signed=False) if sel else "-"


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the table, the error by B_simple/B band."""
    meta, rows = data["meta"], data["rows"]
    pairs: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["problem"], r["batch_size"]), {})[r["method"]] = r
    body_rows = []
    for (problem, b), by_method in pairs.items():
        first = next(iter(by_method.values()))
        body_rows.append([problem, f"{first['exact_noise_scale']:.0f}", b, f"{first['ratio']:.1f}",
                          _cell(by_method.get("micro")), _cell(by_method.get("per_example"))])
    tbl = table(["problem", "exact B_simple", "B", "B_simple/B", "micro: bias / spread / worst",
                 "per-example: bias / spread / worst"], body_rows, "lrrrll")
    low = [r for r in rows if _band(r["ratio"]) <= LOW]
    mid = [r for r in rows if _band(r["ratio"]) == MID]
    high = [r for r in rows if _band(r["ratio"]) > MID]
    high_bands = sorted({_band(r["ratio"]) for r in high})
    splits = Counter(round(r["batch_size"] / r["micro_batch_size"]) for r in rows if r["method"] == "micro")
    singles = sorted({(r["problem"], r["batch_size"]) for r in rows
                      if r["method"] == "micro" and r["micro_batch_size"] == 1})
    return {
        "problems": ", ".join(dict.fromkeys(r["problem"] for r in rows)),
        "n": f"{meta['n']:,}", "batches": meta["batches"], "repeats": meta["repeats"],
        "ratios": ", ".join(f"{x:g}" for x in sorted({_band(r["ratio"]) for r in rows})),
        "seconds": meta["seconds"], "threads": meta["threads"], "torch": meta["torch"], "table": tbl,
        "low_bias": _worst_abs(low, "bias"), "low_worst": _worst_abs(low, "worst"),
        "mid_bias": f"{pct(min(r['bias'] for r in mid))} to {pct(max(r['bias'] for r in mid))}" if mid else "-",
        "mid_worst": _worst_abs(mid, "worst"),
        "high_bias": pct(max(r["bias"] for r in high)) if high else "-", "high_worst": _worst_abs(high, "worst"),
        "single": listing([f"{p} B={b}" for p, b in singles]),
        "low_band": LOW, "mid_band": MID, "high_bands": listing([f"{x:g}" for x in high_bands]) or "-",
        "high_span": span(high_bands, lambda x: f"{x:g}") if high_bands else "-",
        "micro_split": splits.most_common(1)[0][0],
    }
