"""What every subcommand shares: the one-line error convention and the flag value checks.

A bad flag, or a setting the library refuses before any work is done (a budget too small
for one step, an LR range the wrong way round), ends the command with one line on stderr,
``autobatch <command>: error: <what, the rule, the fix>``, and exit status 2; never a
traceback, and never a silently replaced value. So do an output folder that cannot be
written (checked before any work, :func:`output_folder`), a ``--model`` factory that cannot
be imported or called (:func:`call_factory`), and a budget too small for one example
(:func:`out_of_memory`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import inspect
import math
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = ["OPTIMIZERS", "Parser", "byte_size", "call_factory", "device", "fail", "fraction", "non_negative_int",
           "one_line", "out_of_memory", "output_folder", "positive_float", "positive_int"]


# --optimizer name -> the optimizer spec (autobatch.optimizers) it stands for; the SGD ones hold
# lr=0.1, which --lr replaces where a command has one (the probe counts only the state's size)
OPTIMIZERS: dict[str, Any] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    "sgd-plain": functools.partial(torch.optim.SGD, lr=0.1),
}


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
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"is not a device (got {text!r}); e.g. cpu, cuda, cuda:1") from None
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and (backend is None or not backend.is_available()):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine; e.g. cpu")
    return text


def output_folder(flag: str, path: str | Path) -> None:
    """Refuse ``path`` (given as ``flag``) before any work unless it is a folder this process
    can create and write files in; the folders the check creates are removed again.

    Raises:
        ValueError: naming the path and why (an existing file, a file on the way, no permission...).
    """
    from autobatch.train._validate import _writable

    folder = Path(path)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    problems = _writable(folder, flag)
    for created in missing:
        with contextlib.suppress(OSError):
            created.rmdir()
    if problems:
        raise ValueError(problems[0])


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is, or was raised while handling, an out-of-memory error (a budget or
    device too small for one example): a setting, not a bug, for the one-line report."""
    from autobatch.memory.oom import is_oom_error

    seen: BaseException | None = err
    while seen is not None:
        if is_oom_error(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _raised(err: BaseException) -> str:
    """``err`` as ``Type: message (at file:line)``, the line being where it was raised."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {one_line(err)}{where}"


def call_factory(spec: str, returns: str, sizes: tuple[int, ...]) -> tuple:
    """Import ``module:factory`` (the current directory first, as ``python -m`` would), call it
    with no argument, and check it returned a tuple of one of ``sizes`` items whose first is an
    ``nn.Module``.

    Args:
        spec: ``--model``'s value.
        returns: what the factory must return, for messages, e.g. ``"(model, example_batch, loss_fn)"``.
        sizes: the tuple lengths accepted.

    Raises:
        ValueError: for a malformed spec, a module that cannot be imported (missing, a syntax
            error, an error at import), no such function, a function that needs arguments or
            raises, or a wrong return; naming where and the fix, in one line.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model must be module:factory (got {spec!r}), e.g. my_models:build")
    rule = f"--model names a function that takes no argument and returns {returns}"
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` would have it
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as err:
        raise ValueError(f"--model {spec}: {module_name} does not compile: {err.msg} ({err.filename}, line "
                         f"{err.lineno}); fix the syntax error") from None
    except ImportError as err:
        raise ValueError(f"--model {spec}: cannot import {module_name!r} ({one_line(err)}); run from the folder "
                         f"holding {module_name.replace('.', '/')}.py or put that folder on PYTHONPATH") from None
    except Exception as err:
        raise ValueError(f"--model {spec}: importing {module_name} raised {_raised(err)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr!r} (from --model {spec!r})")
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the call decide
        params = []
    required = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise ValueError(f"--model {spec}: {attr} takes arguments ({', '.join(required)}); {rule}")
    try:
        built = factory()
    except Exception as err:
        raise ValueError(f"--model {spec} raised {_raised(err)}; {rule}") from None
    if not (isinstance(built, tuple) and len(built) in sizes and isinstance(built[0], torch.nn.Module)):
        got = (f"a tuple of {len(built)} starting with a {type(built[0]).__name__}" if isinstance(built, tuple) and built
               else f"a {type(built).__name__}")
        raise ValueError(f"--model {spec} must return {returns} (got {got})")
    return built
