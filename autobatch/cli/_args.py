"""What every subcommand shares: the one-line error convention and the flag value checks.

A bad flag, or a setting the library refuses before any work is done (a budget too small
for one step, an LR range the wrong way round), ends the command with one line on stderr,
``autobatch <command>: error: <what, the rule, the fix>``, and exit status 2; never a
traceback, and never a silently replaced value.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from typing import NoReturn

__all__ = ["Parser", "byte_size", "device", "fail", "fraction", "non_negative_int", "one_line",
           "positive_float", "positive_int"]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse's own print the usage first),
    name the closest flag or choice ("did you mean --policy?") and point to the help of the
    command at hand (``autobatch fit --help``, not the top level's); subparsers inherit the
    class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            # A subcommand's parser: report what it does not know itself, under its own name
            # (argparse would hand the words up to the top-level parser, whose help is not it).
            self.error(self.unrecognized(extras))
        return namespace, extras

    def unrecognized(self, words: list[str]) -> str:
        """The message for arguments this parser does not know, with the closest flag of each
        unknown one (``--batch_size``: ``--batch-size``; ``--polcy``: ``--policy``)."""
        flags = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        close = []
        for word in words:
            name = word.split("=", 1)[0]
            if not name.startswith("--"):
                continue
            dashed = name.replace("_", "-")
            close += [dashed] if dashed in flags else difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
        message = f"unrecognized arguments: {' '.join(words)}"
        return f"{message}; did you mean {' and '.join(close)}?" if close else message

    def _check_value(self, action: argparse.Action, value: object) -> None:
        # argparse's own check, with the closest choice named
        if action.choices is not None and value not in action.choices:
            names = [str(c) for c in action.choices]
            close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r} (choose from {', '.join(map(repr, names))})"
                        + (f"; did you mean {close[0]!r}?" if close else ""))


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (pydantic lists its errors over several)."""
    errors = getattr(err, "errors", None)
    if callable(errors) and type(err).__name__ == "ValidationError":
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
            for e in errors()
        )
    return " ".join(str(err).split())


def fail(prog: str, err: BaseException) -> int:
    """Print ``err`` as ``prog``'s one-line error; return the exit status (2)."""
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return 2


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what} (got {text!r})") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a number of epochs)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text!r})")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a batch size, a number of steps or trials)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text!r})")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a seed)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (got {text!r})")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (a margin)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (got {text!r})")
    return value


def byte_size(text: str) -> int:
    """A memory size such as ``4GiB`` or ``500MB``, in bytes (``autobatch.config.parse_bytes``)."""
    from autobatch.config import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def device(text: str) -> str:
    """A torch device string naming a device this machine has (``cpu``, ``cuda:1``, ...)."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"is not a device (got {text!r}); e.g. cpu, cuda, cuda:1") from None
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and (backend is None or not backend.is_available()):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine; e.g. cpu")
    return text
