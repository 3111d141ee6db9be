"""Values for ``pages/gpu_check.md`` from ``gpu_check.json``: every CUDA code path, exercised
once on a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import table


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the run's device and versions, the checks' table and tally."""
    rows = [[r["check"], r["status"], f"{r['seconds']:.1f} s", r["detail"]] for r in data["rows"]]
    return {
        "seconds": data["total_seconds"], "device": data["device"], "torch": data["torch"],
        "cuda": data.get("cuda", "?"), "table": table(["check", "status", "time", "detail"], rows, "llrl"),
        "passed": sum(r["status"] == "pass" for r in data["rows"]), "checks": len(data["rows"]),
    }
