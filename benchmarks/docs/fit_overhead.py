"""Values for ``pages/fit_overhead.md`` from ``fit_overhead.json``: ``autobatch.fit``'s own cost
over a plain PyTorch loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, table, verdict

VARIANTS = ("control", "off", "micro", "micro_auto", "per_example")


def _cell(x: float | None) -> str:
    """A ratio cell: ``1.036x``, or ``-`` for a variant the case did not run."""
    return "-" if x is None else f"{x:.3f}x"


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the table, the targets' verdicts."""
    cases, targets = data["cases"], data["targets"]
    rows = [[name, f"{c['params']:,}", str(c["batch_size"]), f"{c['steps']:,}", f"{c['plain_ms_per_step']:.2f} ms",
             *[_cell(c["ratio"].get(v)) for v in VARIANTS]] for name, c in cases.items()]
    tbl = table(["case", "params", "B", "steps", "plain step", "control", "off", "micro (on)", "micro, auto interval",
                 "per-example"], rows, "lrrrrrrrrr")
    checks = [(case, variant, target, cases[case]["ratio"].get(variant))
              for case, per in targets.items() for variant, target in per.items() if case in cases]
    verdicts = listing([f"{case} {variant} {_cell(got)} (target <= {target}x) {verdict(got is not None and got <= target)}"
                        for case, variant, target, got in checks])
    return {
        "rounds": data["rounds"], "timer": data["timer"], "minutes": data["seconds"] / 60,
        "torch": data["torch"], "load_before": f"{data['load_average_before'][0]:.1f}",
        "load_after": f"{data['load_average_after'][0]:.1f}", "table": tbl, "verdicts": verdicts,
        "met": sum(got is not None and got <= target for *_, target, got in checks), "checks": len(checks),
    }
