"""``autobatch fit``: train a built-in problem with an adaptive batch size, from the shell."""

from __future__ import annotations

import argparse
from pathlib import Path

from autobatch.cli._args import byte_size, device, fail, non_negative_int, positive_float, positive_int

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``autobatch fit``."""
    from autobatch.registry import LOGGERS, LR_SCALINGS, POLICIES, PROBLEMS

    p = subparsers.add_parser(
        "fit",
        help="train a built-in problem with an adaptive batch size",
        description=(
            "Train a built-in problem (data generated locally, nothing downloaded) with "
            "autobatch.fit, print a summary and write a plot and the step history."
        ),
    )
    p.add_argument("--problem", required=True, choices=sorted(PROBLEMS), help="built-in problem")
    p.add_argument("--policy", default="budget", choices=sorted(POLICIES), help="batch-size policy (default: budget)")
    p.add_argument("--lr", type=_lr, default=None,
                   help="base LR at the base batch, > 0, or 'auto' to choose it with a short study "
                        "first (at most half the run's examples more; default: the problem's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="base batch B0 (default: the problem's)")
    p.add_argument("--max-batch-size", type=positive_int, default=None, help="upper bound on B")
    p.add_argument("--lr-scaling", default=None, choices=sorted(LR_SCALINGS),
                   help="LR rule between batch sizes (default: by optimizer)")
    p.add_argument("--max-lr-factor", type=_lr_factor, default=None,
                   help="cap on the LR scaling factor, > 0 (default 2; 'none' removes the cap)")
    p.add_argument("--gns-every", type=_every, default=None,
                   help="split a step in two to measure the noise scale every N steps (default 8), or "
                        "'auto': as rarely as keeps the splits within 5%% of the time")
    p.add_argument("--epochs", type=positive_float, default=None, help="epochs to train (default: the problem's)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda, cuda:1, ... to train on (default: cpu)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="model init and shuffling seed")
    p.add_argument("--budget", type=byte_size, default=None,
                   help="memory budget, e.g. 2GiB (probes the micro-batch)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="write last.pt there at every evaluation, at the end and on Ctrl-C")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint-dir's last.pt if there is one")
    p.add_argument("--out", default="autobatch_runs", help="folder for the plot and history")
    p.add_argument("--loggers", nargs="+", default=[], choices=sorted(LOGGERS), metavar="NAME",
                   help=f"send each step's figures to these loggers as the run goes ({', '.join(sorted(LOGGERS))})")
    p.add_argument("--log-dir", default=None, help="the loggers' folder (default: OUT/PROBLEM-POLICY-logs)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads on CPU (default 1: a run takes the same steps on any number of cores; "
                        "more threads round differently, and the run differs from the first steps on)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run)


def _lr(text: str) -> float | str:
    """``--lr``: a number > 0, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    return positive_float(text)


def _every(text: str) -> int | str:
    """``--gns-every``: an integer >= 1, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, or 'auto' (got {text!r})") from None


def _lr_factor(text: str) -> float | str:
    """``--max-lr-factor``: a number > 0, or ``none`` for no cap."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, or 'none' for no cap (got {text!r})") from None


def _run(args: argparse.Namespace) -> int:
    import torch

    import autobatch
    from autobatch.registry import get_problem

    prog = "autobatch fit"
    if args.resume and args.checkpoint_dir is None:
        return fail(prog, ValueError("--resume needs --checkpoint-dir (the folder holding last.pt)"))
    torch.set_num_threads(args.threads)
    ex = get_problem(args.problem, seed=args.seed)
    overrides = {
        "policy": args.policy,
        "initial_batch_size": args.batch_size if args.batch_size is not None else ex.default_batch_size,
        "seed": args.seed,
        "lr_scaling": args.lr_scaling,
    }
    if args.max_batch_size is not None:
        overrides["max_batch_size"] = args.max_batch_size
    if args.max_lr_factor is not None:
        overrides["max_lr_factor"] = None if args.max_lr_factor == "none" else args.max_lr_factor
    if args.budget is not None:
        overrides["memory_budget"] = args.budget
    if args.gns_every is not None:
        overrides["gns_every"] = args.gns_every
    if args.no_progress:
        overrides["progress"] = False
    if args.loggers:
        overrides["loggers"] = args.loggers
        overrides["log_dir"] = args.log_dir or Path(args.out) / f"{args.problem}-{args.policy}-logs"
    epochs = args.epochs if args.epochs is not None or args.max_steps is not None else ex.default_epochs
    if args.device is not None:
        overrides["device"] = args.device
    try:
        result = autobatch.fit(
            ex.model_fn(),  # fit moves it to the device
            ex.train_data,
            loss_fn=ex.loss_fn,
            val_data=ex.val_data,
            optimizer=ex.optimizer,
            lr=args.lr if args.lr is not None else ex.default_lr,
            epochs=epochs,
            max_steps=args.max_steps,
            eval_fn=lambda model: ex.evaluate(model, ex.val_data),
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            **overrides,
        )
    except ValueError as err:  # settings fit refuses (e.g. a budget too small for one step)
        return fail(prog, err)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.problem}-{args.policy}"
    plot = result.plot(out / f"{stem}.png")
    history = result.to_json(out / f"{stem}.json")
    print(f"autobatch fit --problem {args.problem} --policy {args.policy}")
    print(result.summary())
    if result.lr_search is not None:
        search = result.lr_search
        print(f"lr=auto: base LR {search.lr:.4g} from {len(search.candidates)} candidates in "
              f"[{search.lr_range[0]:g}, {search.lr_range[1]:g}]; the study trained on {search.samples} "
              f"examples ({search.fraction:.0%} of the run)")
    print(f"plot: {plot}\nhistory: {history}")
    if args.loggers:
        print(f"logs: {overrides['log_dir']} ({', '.join(args.loggers)})")
    return 0
