"""One process of a data-parallel study: `torchrun --nproc-per-node=2 ddp_tune_worker.py OUT DB`.

Rank 0 owns the Optuna study; every rank records the learning rates its search space was
asked for, so the test can check that all ranks ran the same trials.
"""

import json
import os
import sys

import optuna
import torch

import autobatch


class PruneLaterTrials(optuna.pruners.BasePruner):
    """Prunes every trial but the first at its first report: a known answer for the test."""

    def prune(self, study, trial) -> bool:
        return trial.number >= 1 and len(trial.intermediate_values) >= 1


def main() -> None:
    out, db = sys.argv[1], sys.argv[2]
    pruner = PruneLaterTrials() if "--prune" in sys.argv else "none"
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + 0.5 * torch.randn(512, 1, generator=g)
    seen = []

    def space(trial):
        lr = trial.suggest_float("lr", 1e-3, 3.0, log=True)
        seen.append(lr)
        return {"lr": lr}

    res = autobatch.search(
        lambda: torch.nn.Linear(4, 1), (x, y), space=space,
        loss_fn=lambda o, t: ((o - t) ** 2).mean(), val_data=(x[:128], y[:128]),
        n_trials=4, trial_length=2, storage=f"sqlite:///{db}", study_name="ddp", seed=0, n_evals=4,
        pruner=pruner,
    )
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "seen": sorted(set(seen)), "returned": res is not None}
    if res is not None:
        record["trials"] = [{"lr": t.params.get("lr"), "state": str(t.state), "value": t.value} for t in res.trials]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)


if __name__ == "__main__":
    from ddp_exit import finish

    main()
    finish()
