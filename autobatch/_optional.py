"""Optional packages, imported where a feature needs them, with the extra that installs them."""

from __future__ import annotations

from typing import Any

__all__ = ["import_pandas"]


def import_pandas(feature: str) -> Any:
    """The ``pandas`` module.

    Raises:
        ImportError: without pandas, naming ``feature`` and the extra that installs it.
    """
    try:
        import pandas
    except ImportError as err:
        raise ImportError(f'{feature} needs pandas: pip install "torch-autobatch[pandas]" (or pip install pandas)') from err
    return pandas
