"""Values for ``pages/time_to_target.md`` from ``time_to_target.json``: steps and samples to a
target, adaptive vs tuned fixed B.

The page has a section per task; its values are grouped under the task's name
(``{{ mnist1d.ratio }}``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs import equal_budget
from benchmarks.docs._md import (
    listing,
    num,
    pct,
    sig,
    span,
    table,
    times,
    verdict,
    word,
)

# Targets of the time-to-target issue (#4), per task: the default adaptive run needs at most
# STEPS x the steps of the best fixed B that uses no more samples, and its final metric is
# within FINAL_GAP of the best fixed B's. No target was set for the other tasks.
TARGETS = {"mnist1d": {"steps": 0.5, "final_gap": 0.005}}
# The adaptive run with the library's defaults for the task's optimizer.
DEFAULT_RUN = {"mnist1d": "default (budget)", "charlm": "default (budget)"}
AUTO_RUN = "default (gns_every=auto)"


def _metric(x: float | None) -> str:
    """A final metric to 3 decimals, ``-`` for none."""
    return "-" if x is None else f"{x:.3f}"


def _tuning_table(tuning: dict[str, Any]) -> str:
    """The LR tuning table: steps to the target per LR tried, per fixed B."""
    rows = [[b, ", ".join(f"{sig(lr, 2)}: {num(s) if s is not None else '-'}" for lr, s in t["tried"]),
             sig(t["best_lr"], 2), "yes" if t["interior"] else "no (edge)"]
            for b, t in tuning.items()]
    return table(["B", "LR: steps", "best LR", "interior"], rows, "rlrl")


def _main_table(rows: dict[str, Any], budget: float) -> str:
    """The target's table: one row per run, medians over seeds."""
    out = []
    for label, r in rows.items():
        vs = r.get("vs_fixed") or {}
        vs_cell = "" if vs.get("steps_ratio") is None else f"{times(vs['steps_ratio'])} {vs['comparator'][len('fixed '):]}"
        seeds = " / ".join("-" if s is None else num(s[0]) for s in r["per_seed"])
        out.append(
            [
                label,
                sig(r["lr"], 2),
                r["reached"],
                num(r["steps"]),
                seeds,
                num(r["samples"]),
                "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}",
                _metric(r["final"]),
                f"{r['steps_over_curve']:.2f}" if "steps_over_curve" in r else "",
                vs_cell,
            ]
        )
    return table(["run", "LR", "reached", "steps", "steps per seed", "samples", "wall s",
                  f"final ({budget:g} ep)", "S/curve", "steps vs fixed B with <= samples"], out, "lrlrrrrrrl")


def _long_table(rows: dict[str, Any]) -> str:
    """The longer target's table."""
    out = []
    for label, r in rows.items():
        vs = r.get("vs_fixed") or {}
        vs_cell = "" if vs.get("steps_ratio") is None else f"{times(vs['steps_ratio'])} {vs['comparator'][len('fixed '):]}"
        out.append([label, r["reached"], num(r["steps"]), num(r["samples"]), vs_cell])
    return table(["run", "reached", "steps", "samples", "steps vs fixed B with <= samples"], out, "llrrl")


def _default_label(name: str, task: dict[str, Any]) -> str:
    """The label of the task's run with the library's defaults."""
    return DEFAULT_RUN.get(name) or task["spec"]["adaptive"][0][0]


def _mnist1d_reading(name: str, task: dict[str, Any]) -> dict[str, Any]:
    """The values the MNIST-1D reading cites: the default against the best fixed B, the other
    adaptive runs, the longer target, the runs' provenance."""
    target, long = task["summary"]["targets"]["target"], task["summary"]["targets"]["long"]
    rows, goal = target["rows"], TARGETS[name]
    default = _default_label(name, task)
    d = rows[default]
    comp = d["vs_fixed"]["comparator"]
    comp_steps = rows[comp]["steps"]
    fixed = sorted((r["batch_size"], lab) for lab, r in rows.items() if lab.startswith("fixed B=") and "decay" not in lab)
    ramp = next(lab for lab in rows if lab.startswith("ramp"))
    n_runs = {lab: int(r["reached"].split("/")[1]) for lab, r in rows.items()}
    full = [lab for lab, r in rows.items() if r["reached"] == f"{n_runs[lab]}/{n_runs[lab]}"]
    long_reached = [f"{lab} ({r['reached']}, {num(r['steps'])} steps, {num(r['samples'])} samples)"
                    for lab, r in long["rows"].items() if not r["reached"].startswith("0/")]
    long_missed = [lab for lab, r in long["rows"].items() if r["reached"].startswith("0/")]
    commits = {r["label"]: r.get("autobatch_commit") for r in task["runs"]}
    rerun = sorted({lab for lab, c in commits.items() if c})
    if rerun and len(rerun) == len(commits) and len(set(commits.values())) == 1:
        provenance = f"every run, the LR tuning included, was made at commit `{next(iter(commits.values()))}`"
    else:
        provenance = (f"the {listing([f'`{lab}`' for lab in rerun])} rows were rerun (`--only`) at the "
                      "commits recorded per run in the JSON; the others record no commit, being older"
                      if rerun else "no run records its commit")
    seeds_ok = [s for s in d["per_seed"] if s is not None]
    b16_seeds = [s[0] for s in rows[fixed[0][1]]["per_seed"] if s is not None]
    b0 = task["base_batch_size"]
    return {
        "reached_all": (
            "all reached it on every seed" if len(full) == len(rows) else f"{len(full)} of {len(rows)} on every seed"
        ),
        "default": default,
        "ratio": times(d["vs_fixed"]["steps_ratio"]),
        "comparator": comp,
        "steps_target": times(goal["steps"], 1),
        "steps_verdict": verdict(d["vs_fixed"]["steps_ratio"] <= goal["steps"]),
        "per_seed": listing([num(s[0]) for s in seeds_ok]),
        "per_seed_ratio": listing([times(s[0] / comp_steps) for s in seeds_ok]),
        "default_final": _metric(d["final"]),
        "gap": f"{100 * d['vs_fixed']['final_gap']:.2f}",
        "gap_target": f"{100 * goal['final_gap']:g}",
        "gap_verdict": verdict(d["vs_fixed"]["final_gap"] <= goal["final_gap"]),
        "default_curve": f"{d['steps_over_curve']:.2f}",
        "ramp_curve": f"{rows[ramp]['steps_over_curve']:.2f}",
        "b_small_curve": f"{rows[fixed[0][1]]['steps_over_curve']:.2f}",
        "b_crit": target["e_min"] / target["s_min"],
        "b0": b0,
        "x2_steps": num(rows["gns/adascale x2"]["steps"]),
        "x2_samples": num(rows["gns/adascale x2"]["samples"]),
        "gp_steps": num(rows["goodput/adascale"]["steps"]),
        "gp_samples": num(rows["goodput/adascale"]["samples"]),
        "gp_final": _metric(rows["goodput/adascale"]["final"]),
        "x05_steps": num(rows["gns/adascale x0.5"]["steps"]),
        "x05_samples": num(rows["gns/adascale x0.5"]["samples"]),
        "lin_steps": num(rows["gns/linear"]["steps"]),
        "lin_final": _metric(rows["gns/linear"]["final"]),
        "ada_steps": num(rows["gns/adascale"]["steps"]),
        "ada_final": _metric(rows["gns/adascale"]["final"]),
        "long_reached": listing(long_reached),
        "long_missed": listing(long_missed),
        "provenance": provenance,
        "default_wall": f"{d['wall_s']:.1f}",
        "comp_wall": f"{rows[comp]['wall_s']:.1f}",
        "auto_wall": f"{rows[AUTO_RUN]['wall_s']:.1f}",
        "auto_steps": num(rows[AUTO_RUN]["steps"]),
        "b16_range": f"{num(min(b16_seeds))}-{num(max(b16_seeds))}",
        "lin_vs_b16": times(rows["gns/linear"]["steps"] / rows[fixed[0][1]]["steps"]),
        "lin_ratio": times(rows["gns/linear"]["vs_fixed"]["steps_ratio"]),
        "lin_comp": rows["gns/linear"]["vs_fixed"]["comparator"],
        "ada_vs_b16": times(rows["gns/adascale"]["steps"] / rows[fixed[0][1]]["steps"]),
        "lin_lr_32": sig(2 * task["summary"]["tuning"][str(b0)]["best_lr"], 2),
        "b32_lr": sig(task["summary"]["tuning"][str(2 * b0)]["best_lr"], 2),
        "worst_steps": num(max(s[0] for s in seeds_ok)),
        "n_seeds_word": word(len(task["seeds"])),
        "n_seeds_title": word(len(task["seeds"])).capitalize(),
        "b2": 2 * b0,
        "b0_lr": sig(task["summary"]["tuning"][str(b0)]["best_lr"], 2),
        **_adascale_lrs(task, b0),
    }


def _adascale_lrs(task: dict[str, Any], b0: int) -> dict[str, str]:
    """``gns/adascale``'s median LR before the target at the two batch sizes above B0 it spent
    most trajectory points at (``0.25 at B=24 and 0.30 at B=32``), and what the linear rule
    gives at those sizes from B0's tuned LR (``0.3 and 0.4``)."""
    at: dict[int, list[float]] = {}
    for r in task["runs"]:
        if r["label"] == "gns/adascale" and r["reached"]:
            for step, b, lr in r["trajectory"]:
                if b > b0 and step < r["reached"]["step"]:
                    at.setdefault(b, []).append(lr)
    sizes = sorted(sorted(at, key=lambda b: -len(at[b]))[:2])
    base = task["summary"]["tuning"][str(b0)]["best_lr"]
    return {"ada_lrs": listing([f"{statistics.median(at[b]):.2f} at B={b}" for b in sizes]) or "-",
            "linear_lrs": listing([f"{base * b / b0:g}" for b in sizes]) or "-"}


def _charlm_reading(name: str, task: dict[str, Any]) -> dict[str, Any]:
    """The values the charlm reading cites: the grid's edges, the default's batch and LR range,
    its steps, samples and final loss against the smallest fixed B."""
    rows = task["summary"]["targets"]["target"]["rows"]
    tuning = task["summary"]["tuning"]
    default = _default_label(name, task)
    d = rows[default]
    comp = rows[d["vs_fixed"]["comparator"]]
    sizes = sorted(int(b) for b in tuning)
    small, large = tuning[str(sizes[0])], tuning[str(sizes[-1])]
    traj = [p for r in task["runs"] if r["label"] == default for p in r["trajectory"]]
    gap = d["vs_fixed"]["final_gap"]
    others = [f"{sig(lr, 2)} {'took ' + num(s) + ' steps' if s is not None else 'did not get there'}"
              for lr, s in small["tried"] if lr != small["best_lr"]]
    return {
        "n_seeds": len(task["seeds"]), "n_sizes": len(sizes), "default": default,
        "b_small": sizes[0], "b_small_lr": sig(small["best_lr"], 2),
        "b_small_interior": "interior" if small["interior"] else "at the edge",
        "b_small_tried": listing(others),
        "b_small_note": "" if small["interior"] else f", so B={sizes[0]} may be under-tuned",
        "b_large": sizes[-1], "b_large_lr": sig(large["best_lr"], 2),
        "b_large_interior": "interior" if large["interior"] else "at the edge of its grid",
        "traj_b": f"{min(p[1] for p in traj)}-{max(p[1] for p in traj)}",
        "traj_lr": f"{sig(min(p[2] for p in traj), 2)} to {sig(max(p[2] for p in traj), 2)}",
        "default_curve": f"{d['steps_over_curve']:.2f}",
        "steps_change": f"{pct(abs(d['steps'] / comp['steps'] - 1), 0, signed=False)} "
                     f"{'fewer' if d['steps'] < comp['steps'] else 'more'}",
        "samples_change": f"{pct(abs(d['samples'] / comp['samples'] - 1), 0, signed=False)} "
                       f"{'more' if d['samples'] > comp['samples'] else 'fewer'}",
        "gap": f"{abs(gap):.3f}", "gap_word": "worse" if gap > 0 else "better",
        "default_commit": next((f"`{r['autobatch_commit']}`" for r in task["runs"]
                             if r["label"] == default and r.get("autobatch_commit")), "unrecorded"),
        "sqrt_steps": num(rows["gns/sqrt"]["steps"]), "sqrt_final": _metric(rows["gns/sqrt"]["final"]),
        "grid_points": span([len(t["tried"]) for t in tuning.values()], str),
        "n_adaptive_word": word(len(task["spec"]["adaptive"])), "n_sizes_word": word(len(sizes)),
    }


#: Task -> the values its reading in the page cites, beyond those every task section has.
READINGS = {"mnist1d": _mnist1d_reading, "charlm": _charlm_reading}


def _task_section(name: str, task: dict[str, Any]) -> dict[str, Any]:
    """The values of one task's section: its setup, the tables, the curve fit, and its reading's."""
    summary, spec = task["summary"], task["spec"]
    target, long = summary["targets"]["target"], summary["targets"]["long"]
    fit = ("fewer than two fixed sizes reached the target on every seed, no curve" if target["s_min"] is None else
           f"S_min = {num(target['s_min'])} steps, E_min = {num(target['e_min'])} samples "
           f"(B_crit = E_min/S_min = {target['e_min'] / target['s_min']:.0f})")
    section = {
        "metric": task["metric"], "cmp": ">=" if task["higher_is_better"] else "<=",
        "target": f"{task['target']:g}", "train": num(task["train_examples"]), "val": num(task["val_examples"]),
        "seeds": ", ".join(str(s) for s in task["seeds"]), "budget": spec["budget_epochs"], "cap": spec["cap_epochs"],
        "max_b": spec["max_batch_size"], "tuning": _tuning_table(summary["tuning"]), "fit": fit,
        "main": _main_table(target["rows"], spec["budget_epochs"]),
        "long_value": f"{long['value']:g}", "best_fixed": _metric(summary["best_fixed_final"]),
        "slack": f"{spec['long_slack']:g}", "long": _long_table(long["rows"]),
    }
    return section | (READINGS[name](name, task) if name in READINGS else {})


def _equal_budget_gap(path: Path) -> str:
    """What the mnist1d reading quotes from the equal-budget page: the per-seed gaps of the
    default fit at a quarter of the tuned LR (``-`` without that file)."""
    if not path.exists():
        return "-"
    return equal_budget.values(json.loads(path.read_text()), path)["r"]["mnist1d"]["tuned4"]["gap_span"]


def values(data: Any, source: Path) -> dict[str, Any]:
    """The page's named values: the protocol's settings, the figure, one group per task."""
    png = source.with_suffix(".png")
    figure = (f"![steps vs samples to the target: fixed B per seed and median, the fitted curve, the other runs]"
              f"(../../benchmarks/results/{png.name})" if png.exists() else "")
    decay = {t["spec"]["decay"] for t in data.values()}
    minutes = {name: f"{task['minutes']:.0f} min in the recorded run ({len(task['seeds'])} seed{'s' * (len(task['seeds']) > 1)})"
               for name, task in data.items()}
    parts = []
    for name, task in data.items():
        d = task["summary"]["targets"]["target"]["rows"].get(_default_label(name, task), {})
        vs = d.get("vs_fixed") or {}
        if vs.get("steps_ratio") is None:
            continue
        goal = TARGETS.get(name)
        met = f" (target {times(goal['steps'], 1)}: {'met' if vs['steps_ratio'] <= goal['steps'] else 'MISSED'})" if goal else ""
        parts.append(f"{name}: `{_default_label(name, task)}` needs {times(vs['steps_ratio'])} the steps of the best "
                     f"fixed B with no more samples{met}")
    sections = {name: _task_section(name, task) for name, task in data.items()}
    if "mnist1d" in sections:
        sections["mnist1d"]["equal_budget_gap"] = _equal_budget_gap(source.with_name("equal_budget.json"))
    return {
        "decay": " / ".join(f"{x:g}" for x in sorted(decay)), "figure": figure,
        "minutes_mnist1d": minutes.get("mnist1d", "not in these results"),
        "minutes_charlm": minutes.get("charlm", "not in these results"),
        "summary": "; ".join(parts),
        **sections,
    }
