"""What the pages share: the rendered :class:`Page`, and the number, table and list formats their
``values()`` functions and the placeholders' named filters use."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Page:
    """One rendered benchmark page.

    Attributes:
        title: the page's heading, also its entry in the index.
        summary: one line for the index: what was measured and the verdicts.
        body: the page's Markdown below its heading.
        written_for: ``benchmarks.docs.digest`` of the results the commentary was written for.
    """

    title: str
    summary: str
    body: str
    written_for: str


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: all l)."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align needs one letter per column (got {align!r} for {len(header)} columns)")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: float | None, digits: int = 0) -> str:
    """``1,402`` / ``0.19``; ``-`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def sig(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures (``0.239``; ``1.5e-3`` below 0.01)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x != 0 and abs(x) < 0.01:
        mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.{digits}g}"


def sci(x: float, digits: int = 2) -> str:
    """``x`` in short scientific notation, trailing zeros dropped: ``5.2e-3``, ``1e-3``, ``1.78e-3``."""
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def pct(x: float, digits: int = 1, signed: bool = True) -> str:
    """A fraction as a percentage: ``0.045`` -> ``+4.5%``."""
    return f"{100 * x:{'+' if signed else ''}.{digits}f}%"


def times(x: float, digits: int = 2) -> str:
    """A ratio: ``1.0909`` -> ``1.09x``."""
    return f"{x:.{digits}f}x"


def verdict(ok: bool) -> str:
    """How a page marks a target: ``met``, or a bold ``MISSED``."""
    return "met" if ok else "**MISSED**"


def span(values: Iterable[float], fmt: Callable[[float], str]) -> str:
    """``lo-hi`` of the values (``lo`` alone when they are all equal), each formatted."""
    vals = sorted(values)
    lo, hi = fmt(vals[0]), fmt(vals[-1])
    return lo if lo == hi else f"{lo} to {hi}" if lo.startswith("-") or hi.startswith("-") else f"{lo}-{hi}"


def listing(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``; ``none`` for no item."""
    items = list(items)
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def word(n: int) -> str:
    """A count as prose writes it: ``six`` up to ten, digits above (``12``)."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)
