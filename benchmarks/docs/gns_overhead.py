"""Values for ``pages/gns_overhead.md`` from ``gns_overhead.json``: the training step's cost with
the estimator on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, span, table, times, verdict

# Targets of the estimator's issue (#2): step time with the estimator over the same step without.
MICRO_TARGET = 1.05
PER_EXAMPLE_TARGET = 1.5


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the table, the verdicts, the models
    compared in the reading."""
    meta, models = data["meta"], data["models"]
    k = {m["micro_batches"] for m in models.values()}
    k_label = "/".join(str(x) for x in sorted(k))
    rows = [
        [name, num(m["params"]), m["batch_size"], f"{m['median_ms']['plain_k']:.1f} ms",
         times(m["ratio"]["control"], 3), times(m["ratio"]["micro"], 3),
         f"{m['median_ms']['plain_1']:.1f} ms", times(m["ratio"]["per_example"]),
         times(m["ratio"]["vmap"], 1)]
        for name, m in models.items()
    ]
    tbl = table(["model", "params", "B", f"plain step (k={k_label})", "control", "micro",
                 "plain step (k=1)", "per-example", "torch.func vmap"], rows, "lrrrrrrrr")

    def verdicts(key: str, target: float, digits: int) -> tuple[str, int]:
        """Each model's ratio and verdict against ``target``, and how many met it."""
        parts = [f"{name} {times(m['ratio'][key], digits)} {verdict(m['ratio'][key] <= target)}"
                 for name, m in models.items()]
        return listing(parts), sum(m["ratio"][key] <= target for m in models.values())

    micro_v, micro_met = verdicts("micro", MICRO_TARGET, 3)
    pe_v, pe_met = verdicts("per_example", PER_EXAMPLE_TARGET, 2)
    by_size = sorted(models.items(), key=lambda kv: kv[1]["params"])
    big_name, big = by_size[-1]
    small = by_size[:-1]
    return {
        "rounds": meta["rounds"], "k": k_label, "seconds": meta["seconds"], "threads": meta["threads"],
        "torch": meta["torch"], "table": tbl, "micro_target": times(MICRO_TARGET),
        "pe_target": times(PER_EXAMPLE_TARGET, 1), "micro_verdicts": micro_v, "pe_verdicts": pe_v,
        "control_span": span((m["ratio"]["control"] for m in models.values()), lambda x: times(x, 3)),
        "big": f"the {num(big['params'])}-parameter {big_name}", "big_pe": times(big["ratio"]["per_example"]),
        "small_pe": listing([f"{n} {times(m['ratio']['per_example'])}" for n, m in small]),
        "small_vmap": listing([f"{n} {times(m['ratio']['vmap'], 1)}" for n, m in small]),
        "big_vmap": times(big["ratio"]["vmap"], 1),
        "micro_span": span((m["ratio"]["micro"] for m in models.values()), times), "micro_met": micro_met,
        "pe_span": span((m["ratio"]["per_example"] for m in models.values()), times), "pe_met": pe_met,
        "models": len(models),
    }
