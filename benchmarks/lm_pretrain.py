"""LM pretraining, one pass over new text: fit's default, the schedule-to-batch conversion and a
fixed ramp against the tuned fixed-B frontier, under warm-up + cosine and WSD (issue 28).

The task (:mod:`benchmarks._lm`): a character transformer trained for one pass (one epoch, no
window repeated) over Python standard-library sources, split by file into training text and a
held-out set, AdamW (weight decay 0.1, betas 0.9/0.95), under the user's schedule as a
``LambdaLR`` on fit's clock (one tick per B0 examples): warm-up 5% then cosine to 10%
(``cosine``), or warm-up, the peak until 80%, then linear to 10% (``wsd``). Every run: 1 torch
thread, one process at a time, the same examples (one pass). Per schedule:

1. ``fixed``: B in :data:`FULL` ``sizes``, ``policy="fixed"``, estimator off, no LR scaling (the
   baseline at its fastest). The peak LR per size from a x2 grid of 3 LRs on seed 0, widened
   (at most ``max_widen`` times) until the best final loss is interior; the grid is centred on
   ``start_lr`` under cosine, and under WSD on the LR cosine chose for that size. The best size on seed
   0, and every size within ``close`` (2%) of it, re-run on the other seeds at its chosen LR;
   the best fixed B is the one with the lowest mean final loss over all seeds.
2. From the best fixed B as B0 and its tuned LR, all seeds: ``default`` (``autobatch.fit``'s
   defaults: policy ``budget``) and ``schedule`` (``policy="schedule"``: where the schedule
   decays the LR by ``d``, B = B0 / d instead, bounded by the noise scale, Adam's square-root
   rule turning the rest into LR).
3. Seed 0 only (``--phase extra`` adds the other seeds): ``ramp`` (B x2 at 25% and 50% of the
   examples, the schedule's LR as written, as Megatron's batch ramp-up does), and the
   ablations of ``schedule``: ``schedule-no-bound`` (``SchedulePolicy(noise_bound=False)``: the
   plain conversion, Seesaw), ``schedule+beta2`` (``scale_betas="beta2"``) and
   ``schedule+wd`` (``scale_weight_decay=True``).

The held-out loss is evaluated at fixed fractions of the examples (:data:`FULL` ``fractions``)
and at the end; wall time excludes it. Target: the best fixed B's mean final loss. Each arm's
steps, tokens and wall time to first reach it are interpolated on its eval curve averaged over
the seeds (:func:`benchmarks._lm.reach`, :func:`benchmarks._lm.mean_curve`), and on each seed's
own curve, and divided by the best fixed B's mean figures over its run. Must show (issue 28),
on the mean curve: the default reaches the target in <= 0.5x the steps at <= 1.05x the
tokens, and its mean final loss is within +0.5% of the target, under both schedules.

    python -m benchmarks.lm_pretrain                          # everything but extra, ~80-90 min on 1 busy core
    python -m benchmarks.lm_pretrain --schedules cosine       # one schedule
    python -m benchmarks.lm_pretrain --phase summary plot     # recompute the summary and the plot
    python -m benchmarks.lm_pretrain --quick --out /tmp/q.json  # tiny sizes, seconds (the test's)

Each run is merged into ``benchmarks/results/lm_pretrain.json`` (or ``--out``) as it ends and
a run already there is not repeated, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autobatch.policies.schedule import SchedulePolicy
from benchmarks._lm import REACH_KEYS, FractionRamp, LMData, ModelSpec, lm_data, run, spec_dict, summarise_arm
from benchmarks._run_info import git_commit

__all__ = ["CRITERIA", "FULL", "QUICK", "Config", "main", "plot", "summarise", "summarise_schedule", "tuning"]

OUT = Path(__file__).resolve().parent / "results" / "lm_pretrain.json"
SCHEDULES = ("cosine", "wsd")
CRITERIA = {"steps_ratio": 0.5, "tokens_ratio": 1.05, "final_vs_target": 0.005}
MACHINE = "2 CPU cores shared with other jobs; 1 torch thread, one benchmark process at a time"


@dataclass(frozen=True)
class Config:
    """The benchmark's sizes (:data:`FULL`; :data:`QUICK` for the test)."""

    chars: int
    context: int
    spec: ModelSpec
    sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    start_lr: dict[int, float]
    fractions: tuple[float, ...]
    eval_windows: int
    held_out_every: int = 20  # every 20th file of the corpus is held out
    max_widen: int = 2  # grid widenings per size, at most
    close: float = 0.02  # sizes within this of the best on seed 0 get every seed
    ramp: tuple[float, ...] = (0.25, 0.5)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Config(
    chars=5_250_000, context=64, spec=ModelSpec(d_model=64, heads=4, layers=3), sizes=(16, 32, 64), seeds=(0, 1, 2),
    start_lr={16: 8e-3, 32: 1.1e-2, 64: 1.6e-2},
    fractions=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0), eval_windows=512,
)
QUICK = Config(
    chars=16_000, context=16, spec=ModelSpec(d_model=16, heads=2, layers=1), sizes=(8, 16), seeds=(0, 1),
    start_lr={8: 4e-3, 16: 8e-3}, fractions=(0.5, 0.75, 1.0), eval_windows=64, held_out_every=3, max_widen=1, quick=True,
)

FIXED = {"policy": "fixed", "gns_method": "off", "lr_scaling": "none"}


def arms(cfg: Config) -> dict[str, Callable[[], dict[str, Any]]]:
    """The arms that start from the best fixed B, as fit overrides (built fresh per run)."""
    return {
        "default": lambda: {},
        "schedule": lambda: {"policy": "schedule"},
        "ramp": lambda: {"policy": FractionRamp(cfg.ramp), "lr_scaling": "none", "gns_method": "off"},
        "schedule-no-bound": lambda: {"policy": SchedulePolicy(noise_bound=False)},
        "schedule+beta2": lambda: {"policy": "schedule", "scale_betas": "beta2"},
        "schedule+wd": lambda: {"policy": "schedule", "scale_weight_decay": True},
    }


ALL_SEEDS = ("default", "schedule")  # the Must show's arms: every seed; the others seed 0 (extra: all)
ARM_NOTES = {
    "default": "fit's defaults (policy budget: linear LR rule, factor <= max_lr_factor 2)",
    "schedule": "policy='schedule' (B = B0 / decay, bounded by the noise scale; square-root LR rule)",
    "ramp": "B x2 at 25% and 50% of the examples, LR as the schedule writes it (lr_scaling='none')",
    "schedule-no-bound": "SchedulePolicy(noise_bound=False): the conversion alone (Seesaw)",
    "schedule+beta2": "policy='schedule', scale_betas='beta2' (beta2^(B/B0))",
    "schedule+wd": "policy='schedule', scale_weight_decay=True (wd x (B/B0) / LR factor)",
}


# -- the JSON ----------------------------------------------------------------------------------------
class Store:
    """The results file: runs merged in as they end, the summary recomputed after each."""

    def __init__(self, path: Path, cfg: Config) -> None:
        self.path, self.cfg = path, cfg

    def load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {"runs": []}

    def runs(self) -> list[dict[str, Any]]:
        return self.load()["runs"]

    def save(self, row: dict[str, Any] | None = None) -> dict[str, Any]:
        data = self.load()
        if row is not None:
            data["runs"] = [r for r in data["runs"] if _key(r) != _key(row)] + [row]
            data["commit"] = git_commit()  # that of the last run written
        data.update(settings(self.cfg))
        data.setdefault("commit", git_commit())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=1) + "\n")  # the run is safe before the summary
        data["summary"] = summarise(data["runs"], self.cfg)
        self.path.write_text(json.dumps(data, indent=1) + "\n")
        return data


def _key(row: dict[str, Any]) -> tuple:
    return (row["schedule"], row["arm"], row["b0"], row["lr"], row["seed"])


def settings(cfg: Config) -> dict[str, Any]:
    data = lm_data(cfg.chars, cfg.context, cfg.eval_windows, cfg.held_out_every)
    return {
        "task": {**data.describe(), "model": spec_dict(cfg.spec, cfg.context),
                 "optimizer": f"AdamW, weight_decay {cfg.weight_decay}, betas {cfg.betas[0]}/{cfg.betas[1]}",
                 "schedules": {"cosine": "warm-up 5% of the examples, cosine to 10% of the peak",
                               "wsd": "warm-up 5%, the peak until 80%, linear to 10% of the peak"},
                 "fractions": list(cfg.fractions)},
        "sizes": list(cfg.sizes), "seeds": list(cfg.seeds), "start_lr": {str(b): v for b, v in cfg.start_lr.items()},
        "max_widen": cfg.max_widen, "close": cfg.close, "ramp": list(cfg.ramp), "arms": ARM_NOTES,
        "all_seed_arms": list(ALL_SEEDS), "wsd_grid_centre": "the LR tuned under cosine for the same B",
        "criteria": CRITERIA, "machine": MACHINE, "quick": cfg.quick,
    }


# -- running -----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg, self.store = cfg, store
        self.data: LMData = lm_data(cfg.chars, cfg.context, cfg.eval_windows, cfg.held_out_every)

    def one(self, schedule: str, arm: str, b0: int, lr: float, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
        key = (schedule, arm, b0, lr, seed)
        done = {_key(r): r for r in self.store.runs()}
        if key in done:
            return done[key]
        cfg = self.cfg
        row = {"arm": arm, **run(self.data, cfg.spec, b0=b0, lr=lr, seed=seed, schedule=schedule, overrides=overrides,
                                 fractions=cfg.fractions, weight_decay=cfg.weight_decay, betas=cfg.betas)}
        self.store.save(row)
        print(f"{schedule:6s} {arm:18s} B0={b0:<3d} lr={lr:<8.3g} seed={seed} loss={_f(row['final_loss'])} "
              f"steps={row['steps']} maxB={row['max_batch_size']} wall={row['wall_s'] or 0:.0f}s "
              f"(+{row['eval_s']:.0f}s eval)", flush=True)
        return row

    def tune(self, schedule: str, b: int) -> None:
        """Seed 0, a x2 grid of 3 LRs around a centre, widened until the best is interior. The
        centre: :data:`Config.start_lr` for the first schedule, the LR tuned for it at this B
        for the others (what a user switching schedules would try first)."""
        first = summarise(self.store.runs(), self.cfg).get(SCHEDULES[0], {}).get("tuned_lr", {})
        centre = first[str(b)] if schedule != SCHEDULES[0] and str(b) in first else self.cfg.start_lr[b]
        ks, widened = {-1, 0, 1}, 0
        while True:
            losses = {}
            for k in sorted(ks):
                loss = self.one(schedule, "fixed", b, _grid(centre, k), self.cfg.seeds[0], FIXED)["final_loss"]
                losses[k] = math.inf if loss is None else loss
            best = min(losses, key=losses.__getitem__)
            if best not in (min(ks), max(ks)) or widened >= self.cfg.max_widen:
                return
            ks.add(best + 1 if best == max(ks) else best - 1)
            widened += 1

    def fixed_seeds(self, schedule: str) -> None:
        """Every seed for the best size on seed 0 and the sizes within ``close`` of it."""
        s = summarise(self.store.runs(), self.cfg).get(schedule, {})
        for b in s.get("all_seed_sizes", []):
            for seed in self.cfg.seeds[1:]:
                self.one(schedule, "fixed", b, s["tuned_lr"][str(b)], seed, FIXED)

    def arm(self, schedule: str, arm: str, seeds: tuple[int, ...]) -> None:
        s = summarise(self.store.runs(), self.cfg).get(schedule, {})
        if "best_fixed" not in s:
            print(f"{schedule}: no best fixed B yet (run the tune and fixed phases first); {arm} skipped", flush=True)
            return
        b0, lr = s["best_fixed"], s["tuned_lr"][str(s["best_fixed"])]
        for seed in seeds:
            self.one(schedule, arm, b0, lr, seed, arms(self.cfg)[arm]())


def _grid(centre: float, k: int) -> float:
    return float(f"{centre * 2.0**k:.6g}")


def _f(x: float | None) -> str:
    return "diverged" if x is None else f"{x:.4f}"


PHASES = ("tune", "fixed", "default", "schedule", "ramp", "ablations", "extra", "summary", "plot")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", nargs="+", default=[x for x in PHASES if x != "extra"], choices=PHASES,
                   help="what to run, in this order (runs already in the JSON are kept); 'extra' gives the ramp and "
                        "the ablations every seed; 'summary' and 'plot' only recompute")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the test; needs --out")
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {OUT})")
    args = p.parse_args(argv)
    if args.quick and args.out is None:
        p.error("--quick writes tiny-size results: give --out PATH (never the benchmark's results file)")
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    store = Store(args.out or OUT, cfg)
    bench = Bench(cfg, store)
    phases = set(args.phase)
    for schedule in args.schedules:  # the Must show's arms first, under every schedule
        if "tune" in phases:
            for b in cfg.sizes:
                bench.tune(schedule, b)
        if "fixed" in phases:
            bench.fixed_seeds(schedule)
        for arm in ALL_SEEDS:
            if arm in phases:
                bench.arm(schedule, arm, cfg.seeds)
    for schedule in args.schedules:  # then the ramp and the ablations, seed 0
        for arm in ("ramp", "schedule-no-bound", "schedule+beta2", "schedule+wd"):
            if (arm == "ramp" and "ramp" in phases) or (arm != "ramp" and "ablations" in phases):
                bench.arm(schedule, arm, cfg.seeds[:1])
    if "extra" in phases:
        for schedule in args.schedules:
            for arm in ("ramp", "schedule-no-bound", "schedule+beta2", "schedule+wd"):
                bench.arm(schedule, arm, cfg.seeds)
    data = store.save()
    if "plot" in phases:
        plot(data, store.path.with_suffix(".png"))
    print(json.dumps({s: _headline(v) for s, v in data["summary"].items()}, indent=1))
    return 0


# -- the summary -------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Per schedule: the LR tuning per size, the best fixed B and the target, and every arm
    against it (:func:`benchmarks._lm.summarise_arm`), with the Must show's verdicts."""
    return {schedule: summarise_schedule([r for r in runs if r["schedule"] == schedule], cfg)
            for schedule in SCHEDULES if any(r["schedule"] == schedule for r in runs)}


def tuning(runs: list[dict[str, Any]], cfg: Config) -> dict[int, dict[str, Any]]:
    """Per size: the seed-0 grid ``{lr: final loss}``, the chosen LR and whether it is interior."""
    out = {}
    for b in cfg.sizes:
        grid = {r["lr"]: r["final_loss"] for r in runs if r["arm"] == "fixed" and r["b0"] == b and r["seed"] == cfg.seeds[0]}
        if grid:
            best = min(grid, key=lambda lr: math.inf if grid[lr] is None else grid[lr])
            out[b] = {"grid": {str(lr): loss for lr, loss in sorted(grid.items())}, "lr": best,
                      "loss": grid[best], "interior": min(grid) < best < max(grid)}
    return out


def summarise_schedule(runs: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    tuned = tuning(runs, cfg)
    out: dict[str, Any] = {"tuning": {str(b): t for b, t in tuned.items()},
                           "tuned_lr": {str(b): t["lr"] for b, t in tuned.items()}}
    if len(tuned) < len(cfg.sizes) or any(t["loss"] is None for t in tuned.values()):
        return out
    top = min(t["loss"] for t in tuned.values())
    out["all_seed_sizes"] = [b for b, t in tuned.items() if t["loss"] <= top * (1 + cfg.close)]
    fixed: dict[int, list[dict[str, Any]]] = {
        b: [r for r in runs if r["arm"] == "fixed" and r["b0"] == b and r["lr"] == t["lr"]] for b, t in tuned.items()}
    complete = {b: rows for b, rows in fixed.items() if b in out["all_seed_sizes"] and len(rows) == len(cfg.seeds)}
    if not complete:
        return out
    best = min(complete, key=lambda b: statistics.mean(r["final_loss"] for r in complete[b]))
    target = statistics.mean(r["final_loss"] for r in complete[best])
    ref = {k: statistics.mean(r[k] for r in complete[best]) for k in ("steps", "tokens", "wall_s")}
    ref["step"] = ref.pop("steps")
    out.update(best_fixed=best, target_loss=target, reference=ref)
    table = {f"fixed B={b}": summarise_arm(rows, target, ref) for b, rows in sorted(fixed.items())}
    for arm in arms(cfg):
        rows = [r for r in runs if r["arm"] == arm and r["b0"] == best and r["lr"] == tuned[best]["lr"]]
        if rows:
            table[arm] = summarise_arm(rows, target, ref)
            by_seed = {r["seed"]: r["final_loss"] for r in complete[best]}
            table[arm]["paired"] = [{"seed": r["seed"], "vs_fixed": r["final_loss"] / by_seed[r["seed"]] - 1}
                                    for r in sorted(rows, key=lambda r: r["seed"])
                                    if r["seed"] in by_seed and r["final_loss"] is not None]
    out["arms"] = table
    d = table.get("default")
    if d is not None and len(d["seeds"]) == len(cfg.seeds):  # on the mean curve over the seeds
        ratios = d["mean_ratios"] or {k: math.inf for k in REACH_KEYS}
        out["must_show"] = {"steps": ratios["step"] <= CRITERIA["steps_ratio"],
                            "tokens": ratios["tokens"] <= CRITERIA["tokens_ratio"],
                            "final": d["final_vs_target"] <= CRITERIA["final_vs_target"]}
    return out


def _headline(s: dict[str, Any]) -> dict[str, Any]:
    """The printed digest of one schedule's summary."""
    out = {"tuned_lr": s.get("tuned_lr"), "best_fixed": s.get("best_fixed"), "target": s.get("target_loss")}
    for label, a in s.get("arms", {}).items():
        m = a["mean_ratios"] or {k: math.inf for k in REACH_KEYS}
        out[label] = (f"loss {a['final_loss_mean']:.4f} ({a['final_vs_target']:+.2%}, {len(a['seeds'])} seeds); mean curve "
                      f"to target: steps {m['step']:.2f}x tokens {m['tokens']:.2f}x wall {m['wall_s']:.2f}x")
    out["must_show"] = s.get("must_show")
    return out


# -- the plot ----------------------------------------------------------------------------------------
PLOTTED = ("fixed", "default", "schedule", "schedule-no-bound", "ramp")


def plot(data: dict[str, Any], path: Path) -> Path | None:
    """B and the LR against tokens, seed 0, per schedule: the best fixed B and the arms of
    :data:`PLOTTED`. None (nothing written) before any schedule has a best fixed B."""
    summary = data.get("summary", {})
    schedules = [s for s in SCHEDULES if "best_fixed" in summary.get(s, {})]
    if not schedules:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(schedules), figsize=(6 * len(schedules), 6.5), squeeze=False, sharex="col")
    seed = data["seeds"][0]
    for j, schedule in enumerate(schedules):
        s = summary[schedule]
        b0, lr0 = s["best_fixed"], s["tuned_lr"][str(s["best_fixed"])]
        for arm in PLOTTED:
            row = next((r for r in data["runs"] if (r["schedule"], r["arm"], r["b0"], r["lr"], r["seed"])
                        == (schedule, arm, b0, lr0, seed)), None)
            if row is None:
                continue
            tokens = [t[1] / 1e6 for t in row["trace"]]
            label = f"fixed B={b0}" if arm == "fixed" else arm
            axes[0, j].step(tokens, [t[2] for t in row["trace"]], where="post", label=label, lw=1.2)
            axes[1, j].plot(tokens, [t[3] for t in row["trace"]], label=label, lw=1.2)
        axes[0, j].set(yscale="log", ylabel="batch size B (sequences)", title=f"{schedule}, seed {seed}")
        axes[1, j].set(xlabel="tokens (millions)", ylabel="learning rate")
        axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())

