"""``autobatch probe``: the largest micro-batch that fits, for a built-in problem or your model.

``--model module:factory`` names a function importable from the current directory (or the
Python path) that takes no argument and returns ``(model, example_batch, loss_fn)``:

- ``model``: an ``nn.Module`` (it is moved to ``--device`` if one is given);
- ``example_batch``: one batch, e.g. ``(inputs, targets)`` with the examples along dimension
  0 (any batch size; its rows are repeated), or a map-style Dataset of ``(input, target)``;
- ``loss_fn``: ``loss_fn(model(inputs), targets)`` -> a scalar tensor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from autobatch.cli._args import OPTIMIZERS, byte_size, call_factory, device, fail, fraction, output_folder, positive_int

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``autobatch probe``."""
    p = subparsers.add_parser(
        "probe",
        help="find the largest micro-batch whose training step fits in memory",
        description=(
            "Estimate the peak memory of a training step on fake tensors (nothing allocated) "
            "and find the largest micro-batch that fits the budget; on an accelerator, "
            "confirm it with real steps. Prints the result table."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--problem", help="a built-in problem: mnist1d, synthetic, charlm")
    source.add_argument("--model", metavar="MODULE:FACTORY",
                        help="a factory returning (model, example_batch, loss_fn)")
    p.add_argument("--budget", type=byte_size, default=None,
                   help="memory the step may use, e.g. 4GiB or 500MB (default: the device's free)")
    p.add_argument("--margin", type=fraction, default=0.1,
                   help="fraction of the budget kept free, in [0, 1) (default 0.1)")
    p.add_argument("--max-micro-batch-size", type=positive_int, default=65_536, help="cap on the answer (a micro-batch size)")
    p.add_argument("--mode", default="auto", choices=["auto", "estimate", "real"],
                   help="estimate: fake tensors only; real: confirm with real steps "
                        "(default auto: real on an accelerator, estimate on CPU)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1, ... (default: the model's)")
    p.add_argument("--optimizer", default=None, choices=sorted(OPTIMIZERS),
                   help="optimizer whose state to count (default: the example's, else adam)")
    p.add_argument("--plot", default=None, help="write peak vs batch size to this PNG")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from autobatch.memory.probe import probe_memory

    prog = "autobatch probe"
    try:
        if args.plot:
            output_folder(f"--plot {args.plot!r}: its folder", Path(args.plot).parent)
        optimizer = OPTIMIZERS[args.optimizer] if args.optimizer else None
        if args.problem is not None:
            from autobatch.registry import get_problem

            ex = get_problem(args.problem)
            model, example, loss_fn = ex.model_fn(), ex.train_data, ex.loss_fn
            if optimizer is None:
                optimizer = lambda params: ex.optimizer(params, ex.default_lr)  # noqa: E731
        else:
            model, example, loss_fn = call_factory(args.model, "(model, example_batch, loss_fn)", (3,))
        if args.device is not None:
            model = model.to(args.device)
    except ValueError as err:
        return fail(prog, err)
    try:
        probe = probe_memory(
            model, example, loss_fn, optimizer or torch.optim.Adam, device=args.device,
            budget_bytes=args.budget, max_micro_batch_size=args.max_micro_batch_size, margin=args.margin,
            mode=args.mode,
        )
    except ValueError as err:  # a budget too small for one step, an example without a batch...
        return fail(prog, err)
    print(probe.table())
    if args.plot:
        try:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            print(f"plot: {probe.plot(Path(args.plot))}")
        except OSError as err:  # checked before the probe: a disk that filled up since
            return fail(prog, err)
    return 0
