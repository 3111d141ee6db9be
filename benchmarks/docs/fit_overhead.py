"""Values for ``pages/fit_overhead.md`` from ``fit_overhead.json``: ``autobatch.fit``'s own cost
over a plain PyTorch loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, pct, span, table, verdict

VARIANTS = ("control", "off", "micro", "micro_auto", "per_example")
#: Steps of the estimator's first window, all of them measured (the library's default).
FIRST_WINDOW = 20
#: A plain step at least this long (ms) is "tens of milliseconds" in the page's reading.
SLOW_STEP_MS = 10.0


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
    with_target = [cases[c]["steps"] for c in targets if c in cases]
    slow = [c["ratio"]["micro"] - 1 for c in cases.values() if c["plain_ms_per_step"] >= SLOW_STEP_MS]
    return {
        "cases": {name: {"steps": c["steps"], "target": "with a target" if name in targets else "no target",
                         **c["ratio"]} for name, c in cases.items()},
        "targets": targets, "target_steps": span(with_target, str),
        "first_window_share": pct(FIRST_WINDOW / min(with_target), 0, signed=False),
        "slow_step_cost": span(slow, lambda x: f"{100 * x:.0f}") + "%" if slow else "-",
        "rounds": data["rounds"], "timer": data["timer"], "minutes": data["seconds"] / 60,
        "torch": data["torch"], "load_before": f"{data['load_average_before'][0]:.1f}",
        "load_after": f"{data['load_average_after'][0]:.1f}", "table": tbl, "verdicts": verdicts,
        "met": sum(got is not None and got <= target for *_, target, got in checks), "checks": len(checks),
    }
