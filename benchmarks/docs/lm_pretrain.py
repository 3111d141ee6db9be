"""Values for ``pages/lm_pretrain.md`` from ``lm_pretrain.json``: one pass over standard-library
text, the tuned fixed-B frontier against fit's default, the schedule-to-batch conversion, a
fixed ramp and the conversion's ablations, under warm-up + cosine and WSD."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.docs._md import listing, num, sci, span, table, times, verdict
from benchmarks.docs._template import PENDING

SCHEDULES = ("cosine", "wsd")
ARMS = ("default", "schedule", "ramp", "schedule-no-bound", "schedule+beta2", "schedule+wd")
ABLATIONS = ("schedule-no-bound", "schedule+beta2", "schedule+wd")
KEY = {"schedule-no-bound": "no_bound", "schedule+beta2": "beta2", "schedule+wd": "wd"}  # names a placeholder can use


def _ratio(x: float | None, digits: int = 2) -> str:
    return "not reached" if x is None or math.isinf(x) else times(x, digits)


def _loss(x: float | None) -> str:
    return "diverged" if x is None else f"{x:.4f}"


def _tuning(s: dict[str, Any]) -> str:
    rows = []
    for b, t in sorted(s.get("tuning", {}).items(), key=lambda kv: int(kv[0])):
        cells = [f"{sci(float(lr))}: {_loss(loss)}" for lr, loss in t["grid"].items()]
        rows.append([b, "; ".join(cells), sci(t["lr"]), "yes" if t["interior"] else "**no**"])
    return table(["B", "peak LR: final loss (seed 0)", "chosen", "interior"], rows, "rlrl") if rows else "No tuning run yet."


def _order(arms: dict[str, Any]) -> list[str]:
    fixed = sorted((k for k in arms if k.startswith("fixed")), key=lambda k: int(k.split("=")[1]))
    return fixed + [a for a in ARMS if a in arms]


def _results(s: dict[str, Any]) -> str:
    rows = []
    for label in _order(s["arms"]):
        a = s["arms"][label]
        med = _mean_ratios(a)
        sd = f" ± {a['final_loss_sd']:.4f}" if len(a["seeds"]) > 1 else ""
        rows.append([
            label, a["b0"], sci(a["lr"]), len(a["seeds"]), f"{a['final_loss_mean']:.4f}{sd}",
            f"{a['final_vs_target']:+.2%}", listing([str(b) for b in sorted(set(a["max_batch_size"]))]),
            num(statistics.mean(a["steps"])), f"{statistics.mean(a['tokens']) / 1e6:.2f}M",
            f"{statistics.mean(a['wall_s']):.0f}", _ratio(med["step"]), _ratio(med["tokens"]),
            _ratio(med["wall_s"]), f"{a['reached']}/{len(a['seeds'])}",
        ])
    return table(["arm", "B0", "peak LR", "seeds", "final loss (mean ± sd)", "vs target", "max B", "steps", "tokens",
                  "wall s", "steps to target", "tokens to target", "wall to target", "seeds reaching it"], rows,
                 "lrrrrrrrrrrrrr")


def _mean_ratios(a: dict[str, Any]) -> dict[str, float | None]:
    """The arm's ratios to the target on its mean curve over the seeds (None: never reached)."""
    return a["mean_ratios"] or {"step": None, "tokens": None, "wall_s": None}


def _paired(s: dict[str, Any], arm: str, seed: int) -> float | None:
    return next((p["vs_fixed"] for p in s["arms"].get(arm, {}).get("paired", []) if p["seed"] == seed), None)


def _seed_row(s: dict[str, Any], arm: str, seed: int) -> dict[str, Any] | None:
    a = s["arms"].get(arm)
    if a is None or seed not in a["seeds"]:
        return None
    i = a["seeds"].index(seed)
    p = a["per_seed"][i]
    return {"loss": p["final_loss"], "steps": a["steps"][i], "max_b": a["max_batch_size"][i],
            "steps_to": None if p["ratios"] is None else p["ratios"]["step"]}


def _ablations(s: dict[str, Any], seed: int) -> str:
    """Seed ``seed`` of the schedule arm and each ablation (and the ramp, the default), paired
    with the best fixed B's run of the same seed (same initial weights, same data order)."""
    base = _seed_row(s, "schedule", seed)
    rows = []
    for arm in ("schedule", *ABLATIONS, "ramp", "default"):
        r = _seed_row(s, arm, seed)
        if r is None:
            continue
        vs_schedule = "-" if base is None or arm == "schedule" or r["loss"] is None else f"{r['loss'] / base['loss'] - 1:+.2%}"
        pair = _paired(s, arm, seed)
        rows.append([arm, _loss(r["loss"]), "-" if pair is None else f"{pair:+.2%}", vs_schedule, num(r["steps"]),
                     r["max_b"], _ratio(r["steps_to"])])
    return table([f"arm (seed {seed})", "final loss", "vs fixed (same seed)", "vs schedule (same seed)", "steps", "max B",
                  "steps to target"], rows, "lrrrrrr") if rows else "No ablation run yet."


def _missing(s: dict[str, Any], data: dict[str, Any]) -> list[str]:
    have = s.get("arms", {})
    want = [f"fixed B={b}" for b in data["sizes"]] + list(ARMS)
    return [a for a in want if a not in have]


def _verdict(s: dict[str, Any], crit: dict[str, float]) -> str:
    d = s.get("arms", {}).get("default")
    if "must_show" not in s or d is None:
        return "not measured (the default's seeds are not all in)"
    ok, med = s["must_show"], _mean_ratios(d)
    return (f"steps {_ratio(med['step'], 3)} (<= {crit['steps_ratio']}x) {verdict(ok['steps'])}; tokens "
            f"{_ratio(med['tokens'], 3)} (<= {crit['tokens_ratio']}x) {verdict(ok['tokens'])}; final loss "
            f"{d['final_vs_target']:+.2%} of the target (<= {crit['final_vs_target']:+.1%}) {verdict(ok['final'])}")


def _reading(s: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """What the prose cites of one schedule."""
    if "arms" not in s:
        return PENDING
    arms, seed = s["arms"], data["seeds"][0]
    fixed = {int(k.split("=")[1]): a for k, a in arms.items() if k.startswith("fixed")}
    best = s["best_fixed"]
    out: dict[str, Any] = {
        "best": best, "best_lr": sci(s["tuned_lr"][str(best)]), "target": f"{s['target_loss']:.4f}",
        "best_sd": f"{arms[f'fixed B={best}']['final_loss_sd']:.4f}",
        "best_span": span([p["final_loss"] for p in arms[f"fixed B={best}"]["per_seed"]], lambda x: f"{x:.4f}"),
        "ref_steps": num(s["reference"]["step"]), "ref_wall": f"{s['reference']['wall_s']:.0f}",
        "others": listing([f"B={b} {a['final_vs_target']:+.1%}" for b, a in sorted(fixed.items()) if b != best]),
        "lrs": listing([f"{sci(s['tuned_lr'][str(b)])} at B={b}" for b in sorted(fixed)]),
        "interior": all(t["interior"] for t in s["tuning"].values()),
        "missing": listing(_missing(s, data)) if _missing(s, data) else "none",
    }
    for arm in ARMS:
        a = arms.get(arm)
        if a is None:
            out[KEY.get(arm, arm)] = PENDING
            continue
        med = _mean_ratios(a)
        r = _seed_row(s, arm, seed)
        out[KEY.get(arm, arm)] = {
            "vs": f"{a['final_vs_target']:+.2%}", "seeds": len(a["seeds"]), "steps": _ratio(med["step"]),
            "tokens": _ratio(med["tokens"]), "wall": _ratio(med["wall_s"]), "reached": f"{a['reached']}/{len(a['seeds'])}",
            "max_b": listing([str(b) for b in sorted(set(a["max_batch_size"]))]),
            "end_steps": times(statistics.mean(a["steps"]) / s["reference"]["step"]),
            "paired": listing([f"{p['vs_fixed']:+.2%}" for p in a.get("paired", [])]),
            "seed0": "-" if r is None else f"{r['loss'] / s['target_loss'] - 1:+.2%}",
            "per_seed_steps": listing([_ratio(None if p["ratios"] is None else p["ratios"]["step"])
                                       for p in a["per_seed"]]),
        }
    return out


def values(data: Any, source: Path) -> dict[str, Any]:
    task, crit, summary = data["task"], data["criteria"], data.get("summary", {})
    model = task["model"]
    fields: dict[str, Any] = {
        "corpus_chars": task["corpus_chars"], "train_chars": task["train_chars"], "held_chars": task["held_out_chars"],
        "train_files": task["train_files"], "held_files": task["held_out_files"], "first_file": task["first_file"],
        "last_file": task["last_file"], "context": task["context"], "windows": task["train_windows"],
        "tokens": task["train_tokens"], "eval_windows": task["eval_windows"], "evals": len(task["fractions"]),
        "params": model["parameters"], "d_model": model["d_model"], "layers": model["layers"], "heads": model["heads"],
        "optimizer": task["optimizer"], "cosine_desc": task["schedules"]["cosine"], "wsd_desc": task["schedules"]["wsd"],
        "sizes": ", ".join(map(str, data["sizes"])), "seeds": listing([str(x) for x in data["seeds"]]),
        "seed0": data["seeds"][0], "start_lrs": listing([f"{sci(v)} at B={b}" for b, v in data["start_lr"].items()]),
        "max_widen": data["max_widen"], "close": f"{data['close']:.0%}", "ramp": listing([f"{f:.0%}" for f in data["ramp"]]),
        "machine": data["machine"], "commit": data.get("commit", "unknown"), "n_runs": len(data["runs"]),
        "total_min": round(sum(r.get("total_s", 0) for r in data["runs"]) / 60),
        "steps_ratio": crit["steps_ratio"], "tokens_ratio": crit["tokens_ratio"],
        "final_pct": f"{crit['final_vs_target']:+.1%}",
    }
    # the plot is written next to the results by `--phase plot` and committed with them
    fields["plot"] = (f"![B and LR against tokens, seed {data['seeds'][0]}, both schedules]"
                      f"(../../benchmarks/results/{source.with_suffix('.png').name})")
    verdicts = []
    for schedule in SCHEDULES:
        s = summary.get(schedule, {})
        fields[f"tuning_{schedule}"] = _tuning(s)
        fields[f"results_{schedule}"] = _results(s) if "arms" in s else "No complete fixed-B frontier yet."
        fields[f"ablations_{schedule}"] = _ablations(s, data["seeds"][0]) if "arms" in s else "-"
        fields[f"verdict_{schedule}"] = _verdict(s, crit)
        fields[schedule] = _reading(s, data)
        ok = s.get("must_show")
        verdicts.append(f"{schedule}: " + ("not measured" if ok is None else
                        f"steps {_ratio(_mean_ratios(s['arms']['default'])['step'])}, final "
                        f"{s['arms']['default']['final_vs_target']:+.1%}, {verdict(all(ok.values()))}"))
    fields["summary_verdict"] = "; ".join(verdicts)
    return fields

