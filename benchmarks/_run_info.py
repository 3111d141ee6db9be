"""What a benchmark's JSON records about the run: the commit it measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["git_commit", "short_commit"]


# Benchmark outputs: a results file or a generated page changed since the commit does not make
# the measured code differ from it (a benchmark that merges into its JSON changes it as it runs).
OUTPUTS = ("benchmarks/results", "docs")


def git_commit() -> str:
    """The checked-out commit, with ``-dirty`` when tracked files other than benchmark outputs
    (``OUTPUTS``) differ from it ("unknown" outside a git checkout)."""
    root = Path(__file__).parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=root, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){path}" for path in OUTPUTS)],
                               capture_output=True, text=True, cwd=root, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty.strip() else "")


def short_commit() -> str:
    """:func:`git_commit` with the hash shortened to 7 characters ("-dirty" kept)."""
    commit = git_commit()
    return commit if commit == "unknown" else commit[:7] + commit[40:]
