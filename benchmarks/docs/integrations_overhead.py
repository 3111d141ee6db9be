"""Values for ``pages/integrations_overhead.md`` from ``integrations_overhead.json``: the
Lightning callback and the HF Trainer subclass against their trainers without autobatch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import span, table


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, one table per trainer, the ratios' span."""
    blocks, ratios = [], []
    for trainer, t in data["trainers"].items():
        rows = []
        for name, m in t["models"].items():
            rows.append([name, f"{m['step_ms_plain']:.1f} ms", f"{m['ratio_fixed']:.3f}",
                         span(m["ratios"]["fixed"], lambda x: f"{x:.2f}"), f"{m['ratio_estimator']:.3f}",
                         span(m["ratios"]["estimator"], lambda x: f"{x:.2f}")])
            ratios.append(m["ratio_estimator"])
        blocks.append(f"**{trainer}** (micro-batch {t['micro_batch']} x {t['accumulation']} accumulated)\n\n"
                      + table(["model", "plain step", "fixed / plain", "per round", "estimator / plain",
                               "per round"], rows, "lrrlrl"))
    return {
        "rounds": data["rounds"], "steps": data["steps_per_run"], "warmup": data["warmup_steps"],
        "timer": data["timer"], "torch": data["torch"], "device": data["device"].upper(),
        "tables": "\n\n".join(blocks), "estimator_span": span(ratios, lambda x: f"{x:.2f}"),
    }
