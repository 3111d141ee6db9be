"""Values for ``pages/ddp_overhead.md`` from ``ddp_overhead.json``: the estimator's cost in
data-parallel training."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, pct, span, table, times, verdict


def _cpu_spread(m: dict[str, Any]) -> dict[str, Any]:
    """A model's per-round CPU-time ratios without the one farthest from their median: the
    steps a round, the median ratio, the span of the rest and the round left out."""
    ratios = sorted(m["cpu_ratios"])
    mid = statistics.median(ratios)
    outlier = max(ratios, key=lambda x: abs(x - mid))
    rest = list(ratios)
    rest.remove(outlier)
    return {"steps": m["steps_per_run"], "cpu_ratio": m["cpu_ratio_median"],
            "cpu_span": span(rest, lambda x: f"{x:.2f}"), "cpu_outliers": f"one round ({outlier:.2f})"}


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the table, the verdicts and spreads."""
    models, target = data["models"], data["target_ratio"]
    rows = [
        [name, num(m["params"]), num(m["steps_per_run"]), f"{m['step_ms_off']:.1f} ms", f"{m['step_ms_micro']:.1f} ms",
         f"{m['ratio_median']:.3f}", span(m["ratios"], lambda x: f"{x:.2f}"),
         f"{m['cpu_ratio_median']:.3f}", verdict(m["ratio_median"] <= target)]
        for name, m in models.items()
    ]
    tbl = table(["model", "params", "steps a round", "step off", "step on", "on/off (median)", "per-round on/off",
                 "CPU time on/off", "target"], rows, "lrrrrrlrl")
    biggest = max(models.values(), key=lambda m: m["params"])
    smallest = min(models.values(), key=lambda m: m["params"])
    timed_ms = sum((m["step_ms_off"] + m["step_ms_micro"]) * m["steps_per_run"] for m in models.values())
    steps = {m["steps_per_run"] for m in models.values()}
    return {
        "world": data["world_size"], "backend": data["backend"], "device": data["device"].upper(),
        "batch": data["global_batch"], "rounds": data["rounds"],
        "steps": listing([f"{num(m['steps_per_run'])} for {name}" for name, m in models.items()]) if len(steps) > 1
        else f"{num(steps.pop())} for every model",
        "torch": data["torch"], "lower_bound": timed_ms / 1e3 * data["rounds"],
        "table": tbl, "target": times(target),
        "verdicts": listing([f"{name} {m['ratio_median']:.3f} {verdict(m['ratio_median'] <= target)}"
                             for name, m in models.items()]),
        "spreads": listing([f"{name} {span(m['ratios'], lambda x: f'{x:.2f}')}" for name, m in models.items()]),
        "grad_mb": biggest["params"] * 4 / 1e6, "big_params_m": biggest["params"] / 1e6,
        "target_pct": pct(target - 1, 0, signed=False), "small": _cpu_spread(smallest),
        "load": ", ".join(f"{x:.1f}" for x in data.get("load_average", [])[:1]) or "unrecorded",
        "ratio_span": span((m["ratio_median"] for m in models.values()), lambda x: f"{x:.3f}"),
        "models": len(models), "met": sum(m["ratio_median"] <= target for m in models.values()),
    }
