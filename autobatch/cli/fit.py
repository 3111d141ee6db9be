"""``autobatch fit``: train a built-in problem, or your own model, with an adaptive batch size."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from autobatch.cli._args import (
    OPTIMIZERS,
    byte_size,
    call_factory,
    device,
    fail,
    non_negative_int,
    out_of_memory,
    output_folder,
    positive_float,
    positive_int,
)

__all__ = ["add_parser"]

_RETURNS = "(model, train_data, loss_fn) or (model, train_data, loss_fn, val_data)"

_MODEL_HELP = """\
--model MODULE:FACTORY names a function importable from the current directory (or the Python
path) that takes no argument and returns (model, train_data, loss_fn) or
(model, train_data, loss_fn, val_data):
  model       an nn.Module (moved to --device if one is given), built after the torch RNG
              is seeded with --seed
  train_data  any form autobatch.fit takes: (X, y) tensors or arrays, a dict of tensors, a
              map-style Dataset, or a DataLoader (its collate_fn pads; its batch size is unused)
  loss_fn     loss_fn(model(inputs), targets) -> a scalar, mean-reduced over the batch; None
              for dict batches whose model returns .loss
  val_data    held-out data in the same forms, evaluated every epoch (optional)
--model needs --lr (a number, or auto) and --epochs or --max-steps; its optimizer is plain
SGD unless --optimizer says otherwise. A factory for `autobatch probe --model` returns
(model, example_batch, loss_fn): one returning all its training data as the example serves both.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``autobatch fit``."""
    from autobatch.registry import LOGGERS, LR_SCALINGS, POLICIES, PROBLEMS

    p = subparsers.add_parser(
        "fit",
        help="train a built-in problem or your model with an adaptive batch size",
        description=(
            "Train a built-in problem (data generated locally, nothing downloaded) or your own "
            "model with autobatch.fit, print a summary and write a plot and the step history."
        ),
        epilog=_MODEL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--problem", choices=sorted(PROBLEMS), help="built-in problem")
    source.add_argument("--model", metavar="MODULE:FACTORY",
                        help="your model: a function returning (model, train_data, loss_fn[, val_data]); see below")
    p.add_argument("--optimizer", default=None, choices=sorted(OPTIMIZERS),
                   help="adam, adamw, sgd (momentum 0.9) or sgd-plain (default: the problem's; sgd-plain with --model)")
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


def _from_problem(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(name for the output files, fit's arguments) for ``--problem``."""
    from autobatch.registry import get_problem

    ex = get_problem(args.problem, seed=args.seed)
    return args.problem, {
        "model": ex.model_fn(),  # fit moves it to the device
        "data": ex.train_data,
        "loss_fn": ex.loss_fn,
        "val_data": ex.val_data,
        "optimizer": OPTIMIZERS[args.optimizer] if args.optimizer else ex.optimizer,
        "lr": args.lr if args.lr is not None else ex.default_lr,
        "epochs": args.epochs if args.epochs is not None or args.max_steps is not None else ex.default_epochs,
        "eval_fn": lambda model: ex.evaluate(model, ex.val_data),
        "initial_batch_size": args.batch_size if args.batch_size is not None else ex.default_batch_size,
    }


def _from_model(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(name for the output files, fit's arguments) for ``--model module:factory``."""
    import torch

    if args.lr is None:
        raise ValueError("--model needs --lr: the base LR at the base batch (a number > 0, e.g. 0.1 for SGD), "
                         "or auto to choose it with a short study first")
    if args.epochs is None and args.max_steps is None:
        raise ValueError("--model needs --epochs or --max-steps: how long to train")
    torch.manual_seed(args.seed)  # the factory's initialisation
    model, data, loss_fn, *val = call_factory(args.model, _RETURNS, (3, 4))
    fit_args = {"model": model, "data": data, "loss_fn": loss_fn, "val_data": val[0] if val else None,
                "optimizer": OPTIMIZERS[args.optimizer or "sgd-plain"], "lr": args.lr, "epochs": args.epochs}
    if args.batch_size is not None:
        fit_args["initial_batch_size"] = args.batch_size
    return args.model.partition(":")[2], fit_args


def _run(args: argparse.Namespace) -> int:
    import torch

    import autobatch

    prog = "autobatch fit"
    torch.set_num_threads(args.threads)
    try:
        if args.resume and args.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir (the folder holding last.pt)")
        output_folder("--out", args.out)  # before the run: its results would be lost after it
        name, fit_args = _from_problem(args) if args.problem is not None else _from_model(args)
    except ValueError as err:
        return fail(prog, err)
    overrides: dict[str, Any] = {"policy": args.policy, "seed": args.seed, "lr_scaling": args.lr_scaling}
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
        overrides["log_dir"] = args.log_dir or Path(args.out) / f"{name}-{args.policy}-logs"
    if args.device is not None:
        overrides["device"] = args.device
    try:
        result = autobatch.fit(**fit_args, max_steps=args.max_steps, checkpoint_dir=args.checkpoint_dir,
                               resume=args.resume, **overrides)
    except ValueError as err:  # settings fit refuses (e.g. a budget too small for one step)
        return fail(prog, err)
    except RuntimeError as err:  # a budget or device too small for one example; anything else is a bug to show
        if not out_of_memory(err):
            raise
        return fail(prog, err)
    stem = f"{name}-{args.policy}"
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot = result.plot(out / f"{stem}.png")
        history = result.to_json(out / f"{stem}.json")
    except OSError as err:  # checked before the run: a disk that filled up since
        return fail(prog, err)
    source = f"--problem {args.problem}" if args.problem is not None else f"--model {args.model}"
    print(f"autobatch fit {source} --policy {args.policy}")
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
