"""Values for ``pages/gpu_check.md`` from ``gpu_check.json``: every CUDA code path, exercised
once on a GPU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from benchmarks.docs._md import pct, table

#: One case of the ``probe_estimate`` check's detail, as ``benchmarks/gpu_check.py`` writes it:
#: ``mlp/fp32/256 1.000 of the count, 0.861 of the allocator's 467 MiB``.
ESTIMATE_CASE = re.compile(r"(\w+)/(\w+)/(\d+) ([\d.]+) of the count, ([\d.]+) of the allocator's (\d+) MiB")


def _estimate_cases(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``probe_estimate`` check's cases: model, precision, batch, estimate / live-storage
    count, estimate / allocator peak, and the allocator's peak in MiB.

    Raises:
        ValueError: no such check, or its detail lists no case in the expected form.
    """
    detail = next((r["detail"] for r in rows if r["check"] == "probe_estimate"), "")
    cases = [{"model": m, "precision": p, "batch": int(b), "count": float(c), "allocator": float(a),
              "allocator_mib": int(mib)} for m, p, b, c, a, mib in ESTIMATE_CASE.findall(detail)]
    if not cases:
        raise ValueError(f"gpu_check.json: the probe_estimate check's detail lists no case of the form "
                         f"'mlp/fp32/256 1.000 of the count, 0.861 of the allocator's 467 MiB' (got {detail!r}); "
                         f"update ESTIMATE_CASE in benchmarks/docs/gpu_check.py to benchmarks/gpu_check.py's format")
    return cases


def _estimate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the memory section cites from the estimate check: the scratch (allocator peak minus
    estimate) of the CNN's and the MLP's smallest and largest fp32 batch, the CNN's range of
    estimate / allocator, the transformer's and the worst shortfall, the count's agreement."""
    cases = _estimate_cases(rows)

    def fp32(model: str) -> list[dict[str, Any]]:
        """The model's fp32 cases by batch size."""
        return sorted((c for c in cases if c["model"] == model and c["precision"] == "fp32"), key=lambda c: c["batch"])

    def scratch(c: dict[str, Any]) -> float:
        """MiB the allocator held beyond the estimate."""
        return c["allocator_mib"] * (1 - c["allocator"])

    cnn, mlp = fp32("cnn_bn"), fp32("mlp")
    cnn_ratios = [c["allocator"] for c in cases if c["model"] == "cnn_bn"]
    transformer = [c["allocator"] for c in cases if c["model"] == "transformer"]
    return {
        "count_agreement": pct(max(0.001, *(abs(c["count"] - 1) for c in cases)), 1, signed=False),
        "cnn_small_mib": scratch(cnn[0]), "cnn_small_batch": cnn[0]["batch"],
        "cnn_large_mib": scratch(cnn[-1]), "cnn_large_batch": cnn[-1]["batch"],
        "cnn_span": f"{min(cnn_ratios):.2f}-{max(cnn_ratios):.2f}",
        "mlp_large_mib": scratch(mlp[-1]), "mlp_large_batch": mlp[-1]["batch"], "mlp_large_ratio": mlp[-1]["allocator"],
        "mlp_small_mib": scratch(mlp[0]), "mlp_small_batch": mlp[0]["batch"], "mlp_small_ratio": mlp[0]["allocator"],
        "transformer_within": pct(1 - min(transformer), 0, signed=False),
        "worst_short": pct(1 - min(c["allocator"] for c in cases), 0, signed=False),
    }


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the run's device and versions, the checks' table and tally
    (passed and skipped counted apart, from the rows: results written before the script wrote
    its own tally have none, and called a skip "skipped (no CUDA)"), and the figures of the
    memory estimate's check (``est``)."""
    rows = [[r["check"], r["status"], f"{r['seconds']:.1f} s", r["detail"]] for r in data["rows"]]
    return {
        "seconds": data["total_seconds"], "device": data["device"], "torch": data["torch"],
        "cuda": data.get("cuda", "?"), "table": table(["check", "status", "time", "detail"], rows, "llrl"),
        "passed": sum(r["status"] == "pass" for r in data["rows"]),
        "skipped": sum(r["status"].startswith("skipped") for r in data["rows"]), "checks": len(data["rows"]),
        "est": _estimate(data["rows"]),
    }
