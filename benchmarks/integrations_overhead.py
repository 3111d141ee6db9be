"""Step time of each trainer integration over the same trainer without it, side by side.

For PyTorch Lightning and the Hugging Face Trainer, the same model, data and global batch
(k micro-batches of m examples accumulated per optimizer step) run in three variants,
alternated round by round in one process (the order rotates each round):

- ``plain``: the trainer alone, ``accumulate_grad_batches`` / ``gradient_accumulation_steps = k``;
- ``fixed``: the integration with ``policy="fixed"``, ``lr_scaling="none"``, ``gns_method="off"``:
  only its machinery (sampler, accumulation driving, LR hooks, history);
- ``estimator``: the same with ``gns_method="micro"``: the micro-batch norm hooks, the step's
  gradient norm and the estimator update as well (B still fixed).

A round runs each variant for a few dozen optimizer steps; its step time is the median of the
step-to-step process CPU time after a warm-up (CPU time, which other jobs on a shared machine
inflate less than wall time; one compute thread). Each reported ratio is the median over
rounds of (variant / plain) in the same round.

    python benchmarks/integrations_overhead.py          # about 3 minutes on this 2-core CPU

Writes benchmarks/results/integrations_overhead.json; `python -m benchmarks.docs` renders
docs/benchmarks/integrations_overhead.md from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "integrations_overhead.json"
VARIANTS = ("plain", "fixed", "estimator")
WARMUP = 5


def _mlp(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


# -- Lightning -----------------------------------------------------------------------------------
LIGHTNING_MODELS = {"mlp-small": (64, 256), "mlp-medium": (256, 1024)}


def _lightning_step_time(variant: str, spec: tuple[int, int], micro: int, k: int, steps: int) -> float:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from autobatch.integrations.lightning import AdaptiveBatchSize

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(*spec)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if len(times) < trainer.global_step:  # an optimizer step just ended
                times.append(time.process_time())

    g = torch.Generator().manual_seed(0)
    n = micro * k * (steps + 1)
    x, y = torch.randn(n, spec[0], generator=g), torch.randint(0, 10, (n,), generator=g)
    callbacks: list[pl.Callback] = []
    if variant != "plain":
        callbacks.append(AdaptiveBatchSize(policy="fixed", lr_scaling="none", initial_batch_size=micro * k,
                                           gns_method="off" if variant == "fixed" else "micro"))
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, Clock()],
                         accumulate_grad_batches=1 if variant != "plain" else k)
    trainer.fit(Classifier(), DataLoader(TensorDataset(x, y), batch_size=micro, shuffle=True))
    return statistics.median(b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1 :]))


# -- Hugging Face Trainer --------------------------------------------------------------------------
HF_MODELS = {"gpt2-tiny": (2, 32), "gpt2-small": (4, 128)}  # (layers, width)
SEQ_LEN = 32


def _hf_step_time(variant: str, spec: tuple[int, int], micro: int, k: int, steps: int) -> float:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from autobatch.integrations.transformers import AdaptiveBatchTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.process_time())

    g = torch.Generator().manual_seed(0)
    n = micro * k * (steps + 1)
    tokens = torch.randint(1, 256, (n, SEQ_LEN), generator=g)
    data = [{"input_ids": row, "labels": row} for row in tokens]

    def collate(items):
        ids = torch.stack([item["input_ids"] for item in items])
        return {"input_ids": ids, "labels": ids}

    layers, width = spec
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=SEQ_LEN, n_embd=width, n_layer=layers,
                                       n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=micro, max_steps=steps,
                                 gradient_accumulation_steps=k if variant == "plain" else 1,
                                 learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, logging_steps=10**6)
        common = {"model": model, "args": args, "train_dataset": data, "data_collator": collate,
                  "callbacks": [Clock()]}
        if variant == "plain":
            trainer = Trainer(**common)
        else:
            trainer = AdaptiveBatchTrainer(**common, autobatch_config={
                "policy": "fixed", "lr_scaling": "none", "initial_batch_size": micro * k,
                "max_micro_batch_size": micro, "gns_method": "off" if variant == "fixed" else "micro"})
        trainer.train()
    return statistics.median(b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1 :]))


# -- harness -------------------------------------------------------------------------------------------
def _measure(step_time, models: dict, micro: int, k: int, steps: int, rounds: int) -> dict:
    rows = {}
    for name, spec in models.items():
        ms = {v: [] for v in VARIANTS}
        ratios = {v: [] for v in VARIANTS[1:]}
        for r in range(rounds):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate the position
            t = {v: step_time(v, spec, micro, k, steps) for v in order}
            for v in VARIANTS:
                ms[v].append(t[v] * 1e3)
            for v in VARIANTS[1:]:
                ratios[v].append(t[v] / t["plain"])
        rows[name] = {
            **{f"step_ms_{v}": statistics.median(ms[v]) for v in VARIANTS},
            **{f"ratio_{v}": statistics.median(ratios[v]) for v in VARIANTS[1:]},
            "ratios": ratios,
        }
    return rows


def _table(results: dict) -> str:
    lines = ["| trainer | model | micro-batch x accumulation | plain ms/step | + integration, fixed B | + estimator |",
             "|---|---|---|---|---|---|"]
    for trainer, block in results["trainers"].items():
        for name, row in block["models"].items():
            lines.append(f"| {trainer} | {name} | {block['micro_batch']} x {block['accumulation']} | "
                         f"{row['step_ms_plain']:.1f} | {row['ratio_fixed']:.3f}x | {row['ratio_estimator']:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results = {
        "rounds": args.rounds, "steps_per_run": args.steps, "warmup_steps": WARMUP, "torch": torch.__version__,
        "timer": "process CPU time", "device": "cpu",
        "trainers": {
            "lightning": {"micro_batch": 64, "accumulation": 4,
                          "models": _measure(_lightning_step_time, LIGHTNING_MODELS, 64, 4, args.steps, args.rounds)},
            "transformers": {"micro_batch": 8, "accumulation": 4,
                             "models": _measure(_hf_step_time, HF_MODELS, 8, 4, args.steps, args.rounds)},
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    table = _table(results)
    print(table)
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
