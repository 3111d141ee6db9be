"""Old names kept for one release: each warns once per use with its new name."""

from __future__ import annotations

import warnings
from typing import Any


def renamed(module: str, old: str, new: str, value: Any) -> Any:
    """Warn that ``module.old`` is now ``module.new`` and return ``value`` (the new object)."""
    warnings.warn(
        f"{module}.{old} was renamed {new}; use {module}.{new} (the old name goes away in the "
        "next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    return value
