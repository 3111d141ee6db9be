"""Values for ``pages/fsdp_overhead.md`` from ``fsdp_overhead.json``: the estimator's cost under
FSDP2, and what each way of syncing gradients during accumulation costs and holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import num, span, table, times, verdict


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the setup, the table, the verdicts and the two modes' contrasts."""
    modes, target = data["modes"], data["target_ratio"]
    rows = [
        [f"`{name}`", f"{m['step_ms_off']:.1f} ms", f"{m['step_ms_on']:.1f} ms", f"{m['ratio_median']:.3f}",
         span(m["ratios"], lambda x: f"{x:.2f}"), f"{m['cpu_ratio_median']:.3f}",
         f"{m['grad_bytes_held'] / 2**20:.2f} MiB", verdict(m["ratio_median"] <= target)]
        for name, m in modes.items()
    ]
    tbl = table(["fsdp_reduce", "step, estimator off", "step, estimator on", "on/off (median)", "per-round on/off",
                 "CPU time on/off", "gradients held", "target"], rows, "lrrrlrrl")
    micro, step = modes["micro_batch"], modes["step"]
    model = data["model"]
    return {
        "world": data["world_size"], "backend": data["backend"], "device": data["device"].upper(),
        "torch": data["torch"], "params": num(model["params"]), "width": model["width"], "depth": model["depth"],
        "context": model["context"], "vocab": model["vocab"], "batch": data["global_batch"],
        "micro": data["micro_batch"], "micro_per_rank": data["global_batch"] // data["world_size"] // data["micro_batch"],
        "rounds": data["rounds"], "steps": data["steps_per_round"], "commit": data["commit"][:7],
        "load": f"{data['load_average'][0]:.1f}", "table": tbl, "target": times(target),
        "verdicts": ", ".join(f"`{n}` {m['ratio_median']:.3f} {verdict(m['ratio_median'] <= target)}"
                              for n, m in modes.items()),
        "met": sum(m["ratio_median"] <= target for m in modes.values()), "n_modes": len(modes),
        "held_micro": f"{micro['grad_bytes_held'] / 2**20:.2f} MiB", "held_step": f"{step['grad_bytes_held'] / 2**20:.2f} MiB",
        "held_ratio": f"{step['grad_bytes_held'] / micro['grad_bytes_held']:.1f}",
        "shard_mib": f"{model['params'] * 4 / data['world_size'] / 2**20:.2f} MiB",
        "full_mib": f"{model['params'] * 4 / 2**20:.2f} MiB",
        "time_ratio": f"{micro['step_ms_off'] / step['step_ms_off']:.2f}",
        "ratio_span": span((m["ratio_median"] for m in modes.values()), lambda x: f"{x:.3f}"),
    }
