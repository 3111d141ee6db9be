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
        **calibration_values(data["calibration"]),
    }


# -- calibration -------------------------------------------------------------------------------
def _pool(rows: list[dict[str, Any]], z: str, key: str) -> float:
    """The fraction of all runs of ``rows`` (equal seeds each) whose interval held the value."""
    return sum(r[z][key] for r in rows) / len(rows)


def _pc(x: float) -> str:
    """A coverage as a whole percentage without the sign: ``0.683`` -> ``68``."""
    return f"{100 * x:.0f}"


def _bounds(rows: list[dict[str, Any]]) -> str:
    """The problems' mean median bounds of the z=1 interval over the exact value, ``0.93-1.08``
    (``inf`` where a problem's median upper bound is infinite)."""
    low = sum(r["z1"]["low"] for r in rows) / len(rows)
    highs = [r["z1"]["high"] for r in rows]
    high = "inf" if None in highs else f"{sum(highs) / len(highs):.2f}"
    return f"{low:.2f}-{high}"


def calibration_values(cal: dict[str, Any]) -> dict[str, Any]:
    """The calibration section's values: three tables pooled over the problems, and ranges."""
    meta, rows = cal["meta"], cal["rows"]
    steps, bands = meta["read_at"], sorted({_band(r["ratio"]) for r in rows})
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    cells: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["scheme"], r["step"], _band(r["ratio"])), []).append(r)
    columns = [(s, t) for s in schemes for t in steps]
    header = ["B_simple/B"] + [f"{s}, {t}" for s, t in columns]

    def band_table(cell: Any) -> str:
        body = [[f"{b:g}"] + [cell(cells[(s, t, b)]) for s, t in columns] for b in bands]
        return table(header, body, "r" * len(header))

    box_table = band_table(lambda sel: f"{_pc(_pool(sel, 'z1', 'box'))} / {_pc(_pool(sel, 'z2', 'box'))}")
    width_table = band_table(_bounds)
    by_column = {(s, t): [r for r in rows if r["scheme"] == s and r["step"] == t] for s, t in columns}

    def pair(sel: list[dict[str, Any]], key: str) -> str:
        return f"{_pc(_pool(sel, 'z1', key))} / {_pc(_pool(sel, 'z2', key))}"

    part_table = table(
        ["scheme", "step", "\\|G\\|^2", "tr(Sigma)", "B_simple (box)", "\\|G\\|^2, plain z", "tr(Sigma), plain z",
         "box, plain z"],
        [[s, t] + [pair(by_column[(s, t)], k) for k in ("grad_sq", "trace_cov", "box", "grad_sq_z", "trace_cov_z",
                                                         "box_z")] for s, t in columns],
        "lrrrrrrr")
    pooled = list(cells.values())

    def rng(z: str, keys: tuple[str, ...], sel: list[list[dict[str, Any]]] = pooled) -> str:
        return span([_pool(c, z, k) for c in sel for k in keys], lambda x: f"{_pc(x)}%")

    unsplit_late = [c for (s, t, _), c in cells.items() if s == "unsplit" and t != steps[0]]
    worst = min(rows, key=lambda r: r["z1"]["box"])
    mean_cells = {(t, b): c for (s, t, b), c in cells.items() if s == "mean"}
    mean_top = max(mean_cells, key=lambda k: _pool(mean_cells[k], "z1", "box"))
    top_rows = mean_cells[mean_top]
    epochs = sum(mean_top[0] * r["batch_size"] / meta["n"] for r in top_rows) / len(top_rows)

    def first_infinite(scheme: str) -> str:
        infinite = [b for b in bands if any(r["z1"]["high"] is None for r in cells[(scheme, steps[-1], b)])]
        return f"{infinite[0]:g}" if infinite else "never"

    narrow = [c for (_, _, b), c in cells.items() if b <= 2]
    runs = meta["seeds"] * len({r["problem"] for r in rows})
    decay = meta["smoothing"] ** meta["every"]
    fpc = sorted({r["exact_noise_scale"] / (meta["n"] - 1) for r in rows})
    return {
        "cal_rows": len(rows), "cal_se": f"{100 * (0.68 * 0.32 / runs) ** 0.5:.1f}",
        "box1_small": rng("z1", ("box",), [c for (_, _, b), c in cells.items() if b <= 1]),
        "box1_large": rng("z1", ("box",), [c for (_, _, b), c in cells.items() if b >= 8]),
        "g1_large": rng("z1", ("grad_sq",), [c for (_, _, b), c in cells.items() if b >= 8]),
        "width_low": f"{min(sum(r['z1']['low'] for r in c) / len(c) for c in narrow):.2f}",
        "width_high": f"{max(sum(r['z1']['high'] for r in c) / len(c) for c in narrow):.2f}",
        "unsplit_decay": f"{decay:.2f}", "unsplit_draws": f"{(1 + decay) / (1 - decay):.0f}",
        "mean_top_bounds": _bounds(top_rows),
        "fpc": span(fpc, lambda x: f"{100 * x:.1f}%"),
        "cal_seeds": meta["seeds"], "cal_steps": listing([str(t) for t in steps]), "cal_last": steps[-1],
        "cal_runs": runs,
        "cal_seconds": meta["seconds"], "cal_every": meta["every"], "cal_first_split": meta["first"],
        "cal_smoothing": meta["smoothing"],
        "cal_box_table": box_table, "cal_part_table": part_table, "cal_width_table": width_table,
        "box1": rng("z1", ("box",)), "box2": rng("z2", ("box",)),
        "part1": rng("z1", ("grad_sq", "trace_cov")), "part2": rng("z2", ("grad_sq", "trace_cov")),
        "unsplit_s1_plain": rng("z1", ("trace_cov_z",), unsplit_late),
        "unsplit_s2_plain": rng("z2", ("trace_cov_z",), unsplit_late),
        "unsplit_s1": rng("z1", ("trace_cov",), unsplit_late), "unsplit_s2": rng("z2", ("trace_cov",), unsplit_late),
        "worst_box1": f"{_pc(worst['z1']['box'])}%",
        "worst_where": (f"{worst['problem']} at B={worst['batch_size']}, B_simple/B {worst['ratio']:.0f}, "
                        f"{worst['scheme']}, step {worst['step']}"),
        "worst_z2": f"{_pc(min(r['z2']['box'] for r in rows))}%",
        "mean_top": f"{_pc(_pool(top_rows, 'z1', 'box'))}%", "mean_top_band": f"{mean_top[1]:g}",
        "mean_top_step": mean_top[0], "mean_top_epochs": f"{epochs:.0f}",
        "split_inf": first_infinite("split"), "unsplit_inf": first_infinite("unsplit"),
        "mean_inf": first_infinite("mean"),
    }
