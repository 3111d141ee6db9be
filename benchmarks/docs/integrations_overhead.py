"""Page for ``integrations_overhead.json``: the Lightning callback and the HF Trainer subclass
against their trainers without autobatch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, span, table

written_for = "4437595edc2d"  # the commentary was checked against these results

TEMPLATE = """\
What `autobatch.integrations` costs on top of the trainer it plugs into (usage: `docs/integrations.md`).

## Protocol

For each trainer, the same model and data run three ways in alternating rounds ({rounds} rounds,
{steps} optimizer steps each after {warmup} warm-up steps, {timer}, torch {torch} on {device}):

- **plain**: the trainer as a user would run it, fixed global batch (micro-batch x accumulation);
- **fixed**: with the integration at the same fixed batch (`policy="fixed"`): only its machinery;
- **estimator**: with the integration measuring the noise scale as well.

Each ratio is the median over rounds of that round's step time over the plain run's.

```bash
python benchmarks/integrations_overhead.py    # writes benchmarks/results/integrations_overhead.json
```

## Results

{tables}

A ratio below 1 means the integrated run was faster than the plain trainer: the HF subclass
hands the Trainer one pre-assembled batch per optimizer step, so the Trainer's per-batch
bookkeeping runs once per step instead of once per micro-batch. The Lightning callback's own
Python work per micro-batch is what shows on the smallest model.
"""


def render(data: Any, source: Path) -> Page:
    blocks, ratios = [], []
    for trainer, t in data["trainers"].items():
        rows = []
        for name, m in t["models"].items():
            rows.append([name, f"{m['step_ms_plain']:.1f} ms", f"{m['ratio_fixed']:.3f}",
                         span(m["ratios"]["fixed"], lambda x: f"{x:.2f}"), f"{m['ratio_estimator']:.3f}",
                         span(m["ratios"]["estimator"], lambda x: f"{x:.2f}")])
            ratios.append(m["ratio_estimator"])
        blocks.append(f"**{trainer}** (micro-batch {t['micro_batch']} x {t['accumulation']} accumulated)\n\n"
                      + table(["model", "plain step", "fixed / plain", "per round", "estimator / plain",
                               "per round"], rows, "lrrlrl"))
    body = TEMPLATE.format(rounds=data["rounds"], steps=data["steps_per_run"], warmup=data["warmup_steps"],
                           timer=data["timer"], torch=data["torch"], device=data["device"].upper(),
                           tables="\n\n".join(blocks))
    summary = f"integration with the estimator / plain trainer: {span(ratios, lambda x: f'{x:.2f}')}x"
    return Page("Integrations overhead", summary, body, written_for)
