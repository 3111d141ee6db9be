"""Equal budget, equal quality: fixed B0 against the default adaptive ``fit`` at the same
epochs and the same base LR (issue 11).

For each task and base LR in ``{tuned/4, tuned/2, tuned}`` and each seed, two runs side by
side (alternating, on 1 CPU thread): ``policy="fixed"`` with the estimator off and no LR
scaling (the user's usual run), and ``fit`` with its defaults. Recorded per run: the final
held-out metric, optimizer steps, samples (examples processed), training wall time, the
largest batch and how often the stability guard cut the LR factor.

Tasks:

- ``mnist1d``: the MNIST-1D CNN (``autobatch.problems.mnist1d.make_cnn``), 6,000 train / 1,500
  test examples (``make_data(num_samples=7500)``), plain SGD, B0 = 32, tuned LR 0.2, metric
  test accuracy in percent; the model is seeded with ``torch.manual_seed(seed)``.
- ``charlm``: the character transformer (``autobatch.problems.charlm``), AdamW, 300k
  characters, 6 epochs, B0 = 32, tuned LR = the problem's ``default_lr`` (3e-3), metric
  held-out loss in nats per character. A short horizon: the loss still falls fast at the end.
- ``charlm-long``: the same model on the whole text (320k characters requested) for 12
  epochs, B0 = 16 and tuned LR 1.5e-3: the best fixed batch and its LR in the tuned sweep of
  ``benchmarks/long_lm.py`` (every LR grid minimum interior), the horizon over which the
  noise scale grows >= 10x.

Until ``fit`` passes the step's loss to ``BatchSizeController.observe``, the run feeds the
default policy's guard from a callback (:meth:`BudgetPolicy.observe_loss`; a step fed twice
counts once, so this stays correct afterwards).

    python -m benchmarks.equal_budget --task mnist1d            # ~15 min on 2 shared cores
    python -m benchmarks.equal_budget --task charlm           # ~20 min (300k characters, 6 epochs)
    python -m benchmarks.equal_budget --task charlm-long      # ~15 min (320k characters, 12 epochs)

Results are merged per (task, lr, seed, method) into ``benchmarks/results/equal_budget.json``
after every run, so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import autobatch
from autobatch.policies import BudgetPolicy
from autobatch.registry import get_problem
from autobatch.train.callbacks import Callback
from benchmarks._run_info import short_commit

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "equal_budget.json"

# The Must show: mean within 0.5 points (accuracy) or 1% (loss) of fixed B0, no seed
# more than 1.5 points behind (accuracy tasks), in <= 0.6x the steps.
CRITERIA = {"acc_mean_points": 0.5, "loss_mean_rel": 0.01, "acc_seed_points": 1.5, "steps_ratio": 0.6}


class _FeedGuard(Callback):
    def __init__(self, policy: BudgetPolicy, base_lr: float) -> None:
        self.policy, self.base_lr = policy, base_lr

    def on_step_end(self, record: Any) -> None:
        self.policy.observe_loss(record.step, record.train_loss, record.lr / self.base_lr)


# tuned LR, epochs, B0, characters of text (charlm tasks)
TASKS: dict[str, dict[str, Any]] = {
    "mnist1d": {"tuned_lr": 0.2, "epochs": 40.0, "initial_batch_size": 32, "chars": None},
    "charlm": {"tuned_lr": 3e-3, "epochs": 6.0, "initial_batch_size": 32, "chars": 300_000},  # sized for 2 shared cores
    "charlm-long": {"tuned_lr": 1.5e-3, "epochs": 12.0, "initial_batch_size": 16, "chars": 320_000},
}


def _task(name: str, seed: int, charlm_chars: int) -> dict[str, Any]:
    if name == "mnist1d":
        from autobatch.problems.mnist1d import make_cnn, make_data

        train, val = make_data(num_samples=7500)
        torch.manual_seed(seed)
        return {"model": make_cnn(), "train": train, "val": val, "loss_fn": torch.nn.functional.cross_entropy,
                "optimizer": torch.optim.SGD, "metric": "val_accuracy", "higher": True, "scale": 100.0}
    ex = get_problem("charlm", seed=seed, max_chars=charlm_chars)
    return {"model": ex.model_fn(), "train": ex.train_data, "val": ex.val_data, "loss_fn": ex.loss_fn,
            "optimizer": ex.optimizer, "metric": "val_loss", "higher": False, "scale": 1.0}


def run_one(task: str, method: str, lr: float, seed: int, epochs: float, charlm_chars: int,
            initial_batch_size: int = 32) -> dict[str, Any]:
    """One fit; returns its row."""
    t = _task(task, seed, charlm_chars)
    kw: dict[str, Any] = {}
    callbacks: list[Callback] = []
    policy = None
    if method == "fixed":
        kw = {"policy": "fixed", "lr_scaling": "none", "gns_method": "off"}
    else:
        policy = BudgetPolicy()
        kw = {"policy": policy}
        callbacks = [_FeedGuard(policy, lr)]
    start = time.perf_counter()
    r = autobatch.fit(t["model"], t["train"], loss_fn=t["loss_fn"], val_data=t["val"], optimizer=t["optimizer"],
                      lr=lr, epochs=epochs, initial_batch_size=initial_batch_size, progress=False, callbacks=callbacks, **kw)
    wall = time.perf_counter() - start
    sizes = [h.batch_size for h in r.history]
    return {
        "task": task, "method": method, "lr": lr, "seed": seed, "epochs": epochs,
        "metric": r.final_metrics[t["metric"]] * t["scale"], "steps": r.steps, "samples": r.samples,
        "wall_s": wall, "max_batch_size": max(sizes), "final_batch_size": sizes[-1],
        "final_lr": r.history[-1].lr, "guard_spikes": policy.guard.spikes if policy else 0,
    }


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}


def _save(data: dict[str, Any]) -> None:
    OUT.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=list(TASKS), required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=None, help="default: mnist1d 40, charlm 6, charlm-long 12")
    p.add_argument("--lr-fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--charlm-chars", type=int, default=None, help="default: charlm 300k, charlm-long 320k")
    p.add_argument("--reuse-fixed", action="store_true",
                   help="keep fixed-B0 rows already in the JSON (they do not depend on the policy)")
    args = p.parse_args()
    torch.set_num_threads(1)
    spec = TASKS[args.task]
    tuned, b0 = spec["tuned_lr"], spec["initial_batch_size"]
    epochs = args.epochs or spec["epochs"]
    chars = args.charlm_chars or spec["chars"]
    commit = short_commit()
    meta = {
        "tuned_lr": tuned, "epochs": epochs, "initial_batch_size": b0, "commit": commit,
        "metric": "test accuracy (%)" if args.task == "mnist1d" else "val loss (nats/char)",
        "higher_is_better": args.task == "mnist1d",
        "charlm_chars": chars if args.task != "mnist1d" else None,
        "machine": "2 shared CPU cores, 1 torch thread per run; other jobs ran at the same time",
    }
    for seed in range(args.seeds):
        for frac in args.lr_fractions:
            # alternate the order so that drift in machine load does not favour one method
            order = ["fixed", "adaptive"] if seed % 2 == 0 else ["adaptive", "fixed"]
            for method in order:
                if args.reuse_fixed and method == "fixed" and any(
                        (x["task"], x["method"], x["lr"], x["seed"]) == (args.task, "fixed", tuned * frac, seed)
                        for x in _load().get("runs", [])):
                    continue
                row = run_one(args.task, method, tuned * frac, seed, epochs, chars, b0)
                row["lr_fraction"] = frac
                print(json.dumps(row), flush=True)
                data = _load()
                key = (row["task"], row["method"], row["lr"], row["seed"])
                data["runs"] = [x for x in data.get("runs", [])
                                if (x["task"], x["method"], x["lr"], x["seed"]) != key] + [row]
                data["criteria"] = CRITERIA
                data.setdefault("tasks", {}).setdefault(args.task, {}).update(meta)
                _save(data)


if __name__ == "__main__":
    main()
