"""Page for ``tune.json``: the base-LR choice of ``tune_lr`` and ``lr="auto"``, re-run with fresh seeds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, listing, num, sig, table, times, verdict

written_for = "bacfc34713f0"  # the commentary was checked against these results

# Targets of issue 13.
REGRET_TARGET = 1.02  # tune_lr's choice, re-run: mean final loss within 2% of the grid's choice
COMPUTE_TARGET = 0.30  # ... for at most 30% of the grid's training examples (medians over sampler seeds)
AUTO_POINTS = 0.5  # lr="auto": accuracy within 0.5 points of the fit at the best LR,
AUTO_LOSS = 0.01  # or a loss within 1%,
AUTO_COMPUTE = 1.5  # for at most 1.5x that single fit's examples (study + run)

OBJECTIVE_NAMES = {
    "tail": "`tail`: mean of the last 2 evaluations (default)",
    "final": "`final`: last evaluation",
    "best": "`best`: lowest evaluation",
    "tail4": "mean of the last 4 evaluations",
    "ema": "moving average of the weights (time constant 1/16 of the budget), last evaluation",
}

TEMPLATE = """\
Whether `autobatch.tune_lr` and `fit(lr="auto")` choose a base learning rate as good as a
dense grid's, for less compute, when every choice is scored by re-running it with fresh
seeds (the design note's rule: the best single run a search saw is the luckiest draw
among many).

## Protocol

{setup_table}

For each task, on {threads} thread:

1. **grid**: every LR of a log grid trained once (model seed 0) for the full budget; its
   choice is the point with the lowest score (the `tail` objective).
2. **re-evaluation**: the better half of the grid by that score re-run with seeds
   {seeds} (model initialisation and data order). An LR's *truth* is its mean final
   validation loss over those runs; *best by mean* is the grid LR whose truth is lowest.
3. **tune_lr**: the trials above over the same range (TPE, the `halving` pruner, the `tail`
   objective, model seed 0), once per sampler seed; its LR is re-run with the same seeds.
   Regret = its truth / the truth of the grid's choice. Compute = its training examples
   (pruned trials up to where they stopped) / the grid's.
4. **lr="auto"**: for each fresh seed, `choose_base_lr` (what `fit(lr="auto")` runs before
   training) on that seed's model, then the full fit at its LR, against the re-evaluation run
   of the best-by-mean LR with the same seed. Compute = study + run, over that single fit.
5. **objectives**: from the curves of the re-evaluated LRs (4 runs each), how well a score of
   one run predicts the LR's truth over the other 3 seeds.

```bash
python benchmarks/tune.py     # the recorded runs took {minutes:.0f} min on {cpus} shared cores
```

## tune_lr against the grid

{tune_tables}

Against the target (regret <= {regret_target} at <= {compute_target:.0%} of the grid's
examples, medians over sampler seeds): {tune_verdicts}.

The grid near its choice, seed 0's score and the truth (mean ± standard error over seeds
{seeds}; `*` the grid's choice, `+` best by mean):

{grid_tables}

## lr="auto"

{auto_table}

Against the target (mean over seeds within {auto_points} points of accuracy / {auto_loss:.0%}
of loss of the fit at the best-by-mean LR, at <= {auto_compute}x its examples):
{auto_verdicts}.

## Which objective

Each row scores one run per LR (a random seed of the 4, {draws} draws) and picks the lowest;
regret is the mean truth of the pick (over the other 3 seeds) over the best truth, and
`regret <= 2%` how often the pick is within 2%. `spread` is the score's seed-to-seed
coefficient of variation at the 3 best LRs. The last three columns use only the first 1, 2
or 4 of the 8 evaluations, as a pruner's rung does: the regret of picking there, and how
often the LR with the best truth ranks in the best third (what a rung with reduction factor
3 keeps).

{objective_tables}

## Reading

{commentary}
"""

COMMENTARY = """\
These runs use the code of this round, whose default policy anneals the batch late in a run
once its loss-spike guard has cut (issue 11); every trial, grid run and re-evaluation is a
default `fit`, so the whole landscape moved since the previous recording (then: grid choice
0.239, truth 0.278; `tune_lr` regret 1.42x; lr="auto" -2.1 points on MNIST-1D).

**MNIST-1D: met on the letter; the noise is as large as the target.** At this budget (10
epochs, B0 = 16) LRs from 0.239 up now fail on seed 0 (scores 1.8-2.3: the default policy
doubles the LR with the batch, and twice 0.24 is past the cliff). The best LR by mean over
seeds 1-3 is 0.157 (truth 0.235 ± 0.040), yet seed 0's run there ended at 0.83, so the grid,
which sees seed 0 only, chose 0.103 (truth 0.362, 1.54x the best by mean). `tune_lr`'s
regret is measured against that choice, as the issue defines it: median 1.012x at 0.24 of the
grid's examples (met), but 1.56x against the best by mean. Per sampler seed the regrets are
1.012, 1.131 and 0.655, and two picks of 0.144 (0.1437 and 0.1442, two sampler seeds) have
truths 0.409 and 0.237: one seed's run in the good region ends anywhere from 0.2 to 0.8, so
a 2% regret is not resolved by 3 seeds either way (a standard error near 1% on each truth
needs hundreds). What holds across both recordings: `tune_lr` picks inside or just below the
good region (0.08-0.23), never past the cliff, for a quarter of the grid's examples with the
`halving` pruner (35-50% with `median`, which stays the default: on the synthetic problem of
the tests, 12 trials under `halving` completed too few runs for the best score to come within
10% of a dense grid's).

**charlm: met.** The loss is smooth in the LR and across seeds (standard errors 0.2-1.9%),
the grid's choice is also the best by mean (1.39e-3), and `tune_lr` lands at 1.017-1.035x of
it (median 1.018x) for 20-23% of the grid's examples.

**Objective.** `tail` (mean of the last 2 of 8 evaluations) stays the default. In this
recording every score ranks about alike: at the full budget on MNIST-1D `tail` 1.307,
`final` 1.305, `best` 1.284, the last 4 evaluations 1.250 (all noise-bound, see above), on
charlm 1.008 for all; at the rungs a pruner judges, `tail` ties or beats `final` (MNIST-1D
after 2 evaluations 1.243 against 1.260, after 4 1.188 against 1.194; charlm after 4 1.009
both), while the last 4 evaluations fall behind on charlm after 4 (1.024). The previous
recording favoured `tail` more clearly at the rungs (MNIST-1D after 2: 1.214 against 1.466).
Evaluating a moving average of the weights ranks best at MNIST-1D's second rung (1.059) and
worse at its fourth (1.254, in the top third 77% of the time): not adopted; it would also need an
averaged copy of every trial's weights.

**lr="auto": met on both, charlm by a small margin.** On MNIST-1D (plain SGD) the study
settles on 0.178 (the geometric mean of the finalists 0.139 and 0.228) on every seed; against
the fit at the best-by-mean LR 0.157 with the same seed the gaps are +1.6, -1.6 and -0.3
points (mean -0.10, met), at 1.45 runs of compute; the seed-to-seed spread of a gap is larger
than the 0.5-point target, so "met" here is one draw. On charlm (AdamW) the study now uses
the Adam rule (`autobatch/tune/auto_lr.py`, module docstring item 5): the finalists are the
best 17-step trial and the LR one grid step below it, and the choice is half a grid step
below the one that ranks first after 33 steps (1/8 of the run). On every seed rung 0 ranked
3.2e-3 first (and 1e-2 second, which the previous rule kept), the finalists were 1e-3 and
3.2e-3, 3.2e-3 led after 33 steps, and the choice was 1.78e-3: +0.78, -0.46 and +2.50% loss
against the best-by-mean LR 1.39e-3 (mean +0.94%, met by 0.06 points; the previous rule
chose 5.6e-3, +6.15%). Seed 3's +2.5% is that run's luck more than the LR's: the same
seed at 1.82e-3, 2% away, ended at 2.163 in the landscape runs below (+0.2%).

Why the rule. A fine landscape of the same task (15 LRs x1.44 apart from 1e-4 to 1.6e-2,
seeds 1-3, 16 evaluations a run; not part of this benchmark) shows the short-horizon bias
directly: the LR with the lowest loss was 3.75e-3 on every seed after 1/16 and 1/8 of the
run, 1.8-5.4e-3 after 1/4, and from 5/16 of the run on 1.8e-3 (1.3-2.6e-3 per seed), the best
LR of the whole run; short trials overrate a larger Adam LR, as Bjorck et al. (2024) found for
LLMs across token horizons. On MNIST-1D with SGD no such drift showed (the best LR after
1/16 of the run was 0.08-0.16 per seed, after the whole run 0.16), so the SGD rule is
unchanged. The rule was designed from this task's landscape, so this row is not an
independent test of it; [auto_lr_adam](auto_lr_adam.md) tries it on Adam tasks it was not
designed on. Letting the winning trial *become* the run (so that a later last rung costs
only its losers) was weighed and not built: on this landscape a comparison late enough to
trust (5/16 of the run) leaves about 0.14 runs for every earlier rung.
"""


def render(data: Any, source: Path) -> Page:
    tasks = data["tasks"]
    setup_rows = []
    tune_tables, tune_verdicts, grid_tables, objective_tables = [], [], [], []
    auto_rows, auto_verdicts = [], []
    summary_parts = []
    for name, res in tasks.items():
        s = res["setup"]
        setup_rows.append([
            f"`{name}`", f"{num(s['train_examples'])} / {num(s['val_examples'])}", s["optimizer"],
            s["initial_batch_size"], f"{s['epochs']:g} ({num(s['samples_per_run'])} examples)",
            f"{s['grid_points']} over [{sig(s['lr_range'][0])}, {sig(s['lr_range'][1])}]",
            f"{s['trials']} x 3 seeds",
        ])
        tune = res["tune_lr"]
        pruners = s["pruners"]
        rows = [[f"`{t['pruner']}`", t["seed"], sig(t["lr"]), _loss(t["truth"]), _ratio(t["regret"]),
                 _ratio(t["regret_vs_best_by_mean"]), f"{t['compute_ratio']:.2f}", f"{t['complete']}/{t['pruned']}"]
                for t in tune]
        rows.append(["grid", "-", sig(res["grid_choice"]), _loss(res["grid_choice_truth"]), "1.000x",
                     _ratio(res["grid_choice_truth"] / res["best_by_mean_truth"]), "1.00", f"{s['grid_points']}/0"])
        tune_tables.append(f"`{name}` (grid: {num(res['grid_samples'])} examples; best by mean "
                           f"{sig(res['best_by_mean'])}, truth {res['best_by_mean_truth']:.4f}):\n\n" + table(
            ["pruner", "sampler seed", "chosen LR", "truth", "regret", "vs best by mean", "examples / grid's",
             "trials complete/pruned"], rows, "lrrrrrrr"))
        med_r, med_c = res["summary"]["median_regret"], res["summary"]["median_compute_ratio"]
        ok = med_r is not None and med_r <= REGRET_TARGET and med_c <= COMPUTE_TARGET
        line = f"`{name}` (`{pruners[0]}`) regret {_ratio(med_r)} at {med_c:.2f} {verdict(ok)}"
        for other in pruners[1:]:
            sel = [t for t in tune if t["pruner"] == other]
            line += (f" (with `{other}`, for comparison: {_ratio(_median([t['regret'] for t in sel]))} at "
                     f"{_median([t['compute_ratio'] for t in sel]):.2f})")
        tune_verdicts.append(line)
        summary_parts.append(f"{name} tune_lr regret {_ratio(med_r)} at {med_c:.0%} "
                             f"{'met' if ok else 'MISSED'}")

        grid = res["grid"]
        shown = [g for g in grid if g["reevaluated"]]
        grid_tables.append(f"`{name}`:\n\n" + table(
            ["LR", "score (seed 0)", "final (seed 0)", "truth"],
            [[sig(g["lr"]) + ("*" if g["lr"] == res["grid_choice"] else "")
              + ("+" if g["lr"] == res["best_by_mean"] else ""),
              _loss(g["score"]), _loss(g["final"]),
              f"{_loss(g['truth'])} ± {g['truth_sem']:.3f}" if g["truth_sem"] is not None else _loss(g["truth"])]
             for g in shown], "rrrr"))

        metric = s["metric"]
        for a in res["auto"]:
            mine = (a["metrics"] or {}).get(metric)
            ref = (a["best_lr_metrics"] or {}).get(metric)
            auto_rows.append([f"`{name}`", a["seed"], sig(a["lr"]) + (" (refined)" if a["refined"] else ""),
                              _metric(mine, metric), sig(res["best_by_mean"]), _metric(ref, metric),
                              _gap(mine, ref, metric), f"{a['study_samples'] / a['run_samples']:.2f}",
                              f"{a['compute_ratio']:.2f}"])
        gap, comp = res["summary"]["auto_mean_gap"], res["summary"]["auto_max_compute_ratio"]
        if metric == "val_accuracy":
            ok = gap is not None and gap >= -AUTO_POINTS and comp <= AUTO_COMPUTE
            shown_gap = f"{gap:+.2f} points" if gap is not None else "-"
        else:
            ok = gap is not None and gap <= AUTO_LOSS and comp <= AUTO_COMPUTE
            shown_gap = f"{100 * gap:+.2f}%" if gap is not None else "-"
        auto_verdicts.append(f"`{name}` {shown_gap} at <= {comp:.2f}x {verdict(ok)}")
        summary_parts.append(f"lr=auto {shown_gap} at {comp:.2f}x {'met' if ok else 'MISSED'}")

        obj = res["objectives"]
        obj_rows = []
        for objective in dict.fromkeys(row["objective"] for row in obj.values()):
            full = obj[f"{objective}@8"]
            obj_rows.append([
                OBJECTIVE_NAMES.get(objective, objective), f"{full['mean_regret']:.3f}",
                f"{full['p_within_2pct']:.0%}",
                f"{full['cv_at_best_lrs']:.3f}" if full["cv_at_best_lrs"] is not None else "-",
                *[f"{obj[f'{objective}@{k}']['mean_regret']:.3f} / {obj[f'{objective}@{k}']['p_best_in_top_third']:.0%}"
                  for k in (1, 2, 4)],
            ])
        objective_tables.append(f"`{name}` ({len(shown)} LRs):\n\n" + table(
            ["score", "regret (8 evals)", "regret <= 2%", "spread", "after 1 eval: regret / top third",
             "after 2", "after 4"], obj_rows, "lrrrrrr"))

    setup_table = table(["task", "train / val", "optimizer", "B0", "budget (epochs)", "grid", "tune_lr trials"],
                        setup_rows, "lllrlll")
    auto_table = table(["task", "seed", "auto LR", "metric", "best LR", "its metric", "gap", "study / run",
                        "compute / run"], auto_rows, "lrrrrrrrr")
    first = next(iter(tasks.values()))
    machine = data["machine"]
    body = TEMPLATE.format(
        setup_table=setup_table, threads=machine["threads"], seeds=listing([str(x) for x in first["setup"]["fresh_seeds"]]),
        minutes=data["work_wall_time_s"] / 60, cpus=machine["cpus"],
        tune_tables="\n\n".join(tune_tables), regret_target=REGRET_TARGET, compute_target=COMPUTE_TARGET,
        tune_verdicts=listing(tune_verdicts), grid_tables="\n\n".join(grid_tables), auto_table=auto_table,
        auto_points=AUTO_POINTS, auto_loss=AUTO_LOSS, auto_compute=AUTO_COMPUTE, auto_verdicts=listing(auto_verdicts),
        draws=f"{2000:,}", objective_tables="\n\n".join(objective_tables), commentary=COMMENTARY.strip(),
    )
    summary = "; ".join(summary_parts)
    return Page("Base-LR choice re-run with fresh seeds (tune_lr, lr=\"auto\")", summary, body, written_for)


def _median(values: list[float | None]) -> float | None:
    vals = sorted(math.inf if v is None else v for v in values)
    return vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else times(x, 3)


def _metric(x: float | None, metric: str) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if metric == "val_accuracy" else f"{x:.4f}"


def _gap(mine: float | None, ref: float | None, metric: str) -> str:
    if mine is None or ref is None:
        return "-"
    return f"{100 * (mine - ref):+.1f} pt" if metric == "val_accuracy" else f"{100 * (mine / ref - 1):+.2f}%"

