"""The ``autobatch`` command line.

Each capability keeps its subcommand next to its code: a module listed in ``_SUBCOMMANDS``
defines ``add_parser(subparsers)``, which registers the subcommand and sets ``func`` (taking
the parsed ``argparse.Namespace`` and returning an exit code) as its default.

Errors follow one convention (:mod:`autobatch.cli._args`): a bad flag value, or a setting
the library refuses before doing any work, prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from autobatch._version import __version__
from autobatch.cli._args import Parser

# subcommand name -> module defining add_parser(subparsers)
_SUBCOMMANDS: dict[str, str] = {
    "fit": "autobatch.cli.fit",
    "probe": "autobatch.cli.probe",
    "tune": "autobatch.cli.tune",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = Parser(
        prog="autobatch",
        description=(
            "Adaptive batch size for PyTorch: measure the gradient noise scale while training, "
            "track the critical batch size, rescale the learning rate, stay inside memory."
        ),
    )
    parser.add_argument("--version", action="version", version=f"autobatch {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in _SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autobatch`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if argv is None and len(sys.argv) <= 1 else 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
