"""``autobatch tune``: find the base learning rate of a built-in problem with Optuna."""

from __future__ import annotations

import argparse
from pathlib import Path

from autobatch.cli._args import fail, non_negative_int, output_folder, positive_float, positive_int

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``autobatch tune``."""
    from autobatch.registry import POLICIES, PROBLEMS, PRUNERS
    from autobatch.tune.study import DEFAULT_STORAGE

    p = subparsers.add_parser(
        "tune",
        help="find the base learning rate of a built-in problem (Optuna study)",
        description=(
            "Search the base LR (at the base batch) of a built-in problem on a log scale: one "
            "adaptive-batch autobatch.fit run per trial, hopeless trials pruned. The study is "
            "stored (a SQLite file by default), so running the command again with the same "
            "--study resumes it and adds --trials more."
        ),
    )
    p.add_argument("--problem", required=True, choices=sorted(PROBLEMS), help="built-in problem")
    p.add_argument("--trials", type=positive_int, default=20, help="trials to add to the study (default: 20)")
    p.add_argument("--epochs", type=positive_float, default=3.0,
                   help="training length of every trial, in epochs (default: 3)")
    p.add_argument("--evals", type=positive_int, default=8,
                   help="validation evaluations per trial, for the pruner (default: 8)")
    p.add_argument("--lr-min", type=positive_float, default=1e-4, help="lower end of the LR range (default: 1e-4)")
    p.add_argument("--lr-max", type=positive_float, default=3.0, help="upper end of the LR range (default: 3)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default: {DEFAULT_STORAGE})")
    p.add_argument("--study", default=None, help="study name (default: tune-<example>); reuse it to resume")
    p.add_argument("--pruner", default="median", choices=sorted(PRUNERS), help="trial pruner (default: median)")
    p.add_argument("--policy", default="budget", choices=sorted(POLICIES), help="batch-size policy (default: budget)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="base batch B0 the LR is for (default: the problem's)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the sampler, the model init and the data order")
    p.add_argument("--out", default="autobatch_runs", help="folder for the plot (default: autobatch_runs)")
    p.add_argument("--verbose", action="store_true", help="show Optuna's per-trial log lines")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from autobatch.registry import get_problem
    from autobatch.tune.study import tune_lr

    prog = "autobatch tune"
    if args.lr_min >= args.lr_max:
        return fail(prog, ValueError(
            f"--lr-min must be below --lr-max (got --lr-min {args.lr_min:g}, --lr-max {args.lr_max:g})"))
    try:
        output_folder("--out", args.out)  # before the study: the plot would be lost after it
    except ValueError as err:
        return fail(prog, err)
    ex = get_problem(args.problem, seed=args.seed)
    b0 = args.batch_size if args.batch_size is not None else ex.default_batch_size
    study = args.study or f"tune-{args.problem}"
    try:
        result = tune_lr(
            ex.model_fn,
            ex.train_data,
            loss_fn=ex.loss_fn,
            val_data=ex.val_data,
            n_trials=args.trials,
            trial_length=args.epochs,
            lr_range=(args.lr_min, args.lr_max),
            optimizer=ex.optimizer,
            storage=args.storage,
            study_name=study,
            pruner=args.pruner,
            config={"initial_batch_size": b0, "policy": args.policy, "seed": args.seed},
            seed=args.seed,
            n_evals=args.evals,
            verbose=args.verbose,
        )
    except ValueError as err:  # a malformed storage URL, a read-only database...
        return fail(prog, err)
    print(f"autobatch tune --problem {args.problem}: study {study!r} in {args.storage}")
    print(result.table())
    if result.best_lr is None:
        print("no trial completed: every LR diverged or was pruned; try a lower --lr-max")
        return 1
    print(f"best base LR: {result.best_lr:.4g} at B0={b0} (val_loss={result.best_value:.4g}, "
          f"{len(result.trials)} trials, {result.total_samples} examples trained in all)")
    try:
        plot = result.plot(Path(args.out) / f"tune-{args.problem}.png")
    except OSError as err:  # checked before the study: a disk that filled up since
        return fail(prog, err)
    print(f"plot: {plot}")
    return 0
