"""Values for ``pages/probe.md`` from ``probe.json``: the memory probe against a
doubling-then-bisection search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, pct, span, table, verdict

# Targets of the probe's issue (#3): the true maximum, found in under this many seconds.
SECONDS_TARGET = 5.0


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the table, the verdicts, the cases whose
    allocator peak passed their budget."""
    rows = data["rows"]
    body_rows = [
        [r["model"], f"{r['budget_mib']} MiB", num(r["true_max"]),
         f"{num(r['probe_found'])} ({r['probe_fraction_of_true']:.0%})", r["probe_real_steps"],
         f"{r['probe_wall_s_median']:.2f}", f"{r['probe_profiler_peak_mib']:.2f}",
         num(r["baseline_found"]), r["baseline_real_steps"], f"{r['baseline_wall_s_median']:.2f}"]
        for r in rows
    ]
    tbl = table(["model", "budget", "true max", "probe found", "probe real steps", "probe s",
                 "profiler MiB", "baseline found", "baseline real steps", "baseline s"],
                body_rows, "llrrrrrrrr")
    exact = sum(r["probe_found"] == r["true_max"] and r["truth_checked"] for r in rows)
    slow = [r for r in rows if r["probe_wall_s_median"] > SECONDS_TARGET]
    if slow:
        slow_verdict = verdict(False) + " by " + listing(
            [f"{r['model']} at {r['budget_mib']} MiB ({r['probe_wall_s_median']:.1f} s)" for r in slow])
    else:
        slow_verdict = verdict(True) + f" (slowest {max(r['probe_wall_s_median'] for r in rows):.1f} s)"
    over = [r for r in rows if not r["profiler_peak_within_budget"]]
    if over:
        scratch = "on CPU, " + listing(
            [f"{r['model']} at {r['budget_mib']} MiB peaks "
             f"{pct(r['probe_profiler_peak_mib'] / r['budget_mib'] - 1, 0, signed=False)} above its budget"
             for r in over]
        ) + " at the allocator (oneDNN convolution scratch), which neither the probe's count nor the budget guard sees"
    else:
        scratch = "in this run every found size's allocator peak stayed within its budget"
    faster = [r for r in rows if r["baseline_wall_s_median"] < r["probe_wall_s_median"]]
    load = data["load_average_1min"]
    return {
        "repeats": data["repeats"], "threads": data["threads"], "import_s": data["one_time_fake_tensor_import_s"],
        "lower_bound": data["repeats"] * sum(r["probe_wall_s_median"] + r["baseline_wall_s_median"] for r in rows),
        "load_start": load["start"], "load_end": load["end"], "cores": load["cores"],
        "table": tbl, "exact": exact, "n": len(rows),
        "probe_steps": span((r["probe_real_steps"] for r in rows), str),
        "baseline_steps": span((r["baseline_real_steps"] for r in rows), str),
        "exact_verdict": verdict(exact == len(rows)), "seconds_target": SECONDS_TARGET,
        "slow_verdict": slow_verdict, "scratch": scratch,
        "baseline_faster": listing([f"{r['model']} at {r['budget_mib']} MiB, whose maximum is {num(r['true_max'])}: "
                                    f"{r['baseline_wall_s_median']:.2f} s against the probe's {r['probe_wall_s_median']:.2f} s"
                                    for r in faster]) if faster else "none in this run",
        "summary_slow": "met" if not slow else f"MISSED in {len(slow)} of {len(rows)} cases",
    }
