"""A page source (``benchmarks/docs/pages/<name>.md``) and the few rules that fill it.

A page source is Markdown a person edits. It starts with a front matter block::

    ---
    written_for: 54452908044f
    summary: exact maximum in {{ exact }} of {{ cases }} cases
    ---
    # Memory probe

    Prose, with {{ name }} where a value goes and {{ name | .2f }} to format a number.

- ``written_for``: the digest of the results the commentary was last reread against
  (``python -m benchmarks.docs --digests``); the page warns at the top while it differs.
- ``summary``: the page's one line in ``docs/README.md`` (placeholders allowed).
- The first line after the front matter is the page's ``# Title``.

Placeholders (the whole syntax):

- ``{{ name }}``: the value the page's ``values()`` returned under ``name``, as ``str()`` would
  show it; ``{{ name.key }}`` looks ``key`` up in a dict value (``{{ mnist1d.steps }}``).
- ``{{ name | spec }}``: the value through Python's ``format(value, spec)``: ``,`` (``1,402``),
  ``.2f`` (``0.19``), ``+.1%`` (``+4.5%``), ``g``; or a named filter: ``sig`` / ``sig2``, three /
  two significant figures (``0.239``, ``1.39e-3`` below 0.01); ``e2`` / ``e3``, scientific
  notation to two / three significant figures without trailing zeros (``5.2e-3``, ``1e-3``).

A placeholder sits on one line; ``{{{ name }}}`` gives the value between literal braces. There is
no escape, loop or condition: text that depends on the results (a verdict, a table, a list of
models) is a value computed in Python. A name with no value, a value that no placeholder uses,
and a ``{{`` or ``}}`` left unmatched are errors that name the page and the line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.docs._md import Page, sci, sig

__all__ = ["FILTERS", "PENDING", "PageSource", "Pending", "TemplateError", "fill", "read_source", "render_source"]

#: ``{{ name }}`` or ``{{ name | spec }}``; innermost braces, so ``{{{ x }}}`` keeps one brace each side.
PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")
NAME = re.compile(r"[A-Za-z_]\w*(?:\.[\w-]+)*")
FRONT_KEYS = ("written_for", "summary")

#: Named formats a placeholder may use instead of a format spec.
FILTERS: dict[str, Callable[[Any], str]] = {
    "sig": sig,
    "sig2": lambda x: sig(x, 2),
    "e2": sci,
    "e3": lambda x: sci(x, 3),
}


class Pending(Mapping[str, Any]):
    """A value for results not recorded yet (a benchmark still running): every key of it is
    itself, and it shows as ``-`` whatever the format, so a page renders before its run ends."""

    def __getitem__(self, key: str) -> Pending:
        """Any key: the same pending value."""
        return self

    def __contains__(self, key: object) -> bool:
        """Every key is there."""
        return True

    def __iter__(self) -> Iterator[str]:
        """No key to list."""
        return iter(())

    def __len__(self) -> int:
        """No key to count."""
        return 0

    def __format__(self, spec: str) -> str:
        """``-`` for any format spec."""
        return "-"

    def __str__(self) -> str:
        """``-``."""
        return "-"


#: The one pending value (``{"arm": PENDING}`` renders ``{{ arm.default.mean | .4f }}`` as ``-``).
PENDING = Pending()


class TemplateError(ValueError):
    """A page source that cannot be filled: names the file, the line and the fix."""


@dataclass(frozen=True)
class PageSource:
    """A parsed page source.

    Attributes:
        path: the ``.md`` file it was read from (for error messages).
        written_for: digest of the results its commentary was last reread against.
        summary: the index line, still a template.
        summary_line: the summary's line number in the file.
        body: the title line and everything below it, still a template.
        body_line: the line number of the body's first line (the title) in the file.
    """

    path: Path
    written_for: str
    summary: str
    summary_line: int
    body: str
    body_line: int


def read_source(path: Path) -> PageSource:
    """Parse a page source's front matter and body.

    Raises:
        TemplateError: no front matter, an unknown or missing key, or no ``# Title`` line.
    """
    lines = path.read_text().split("\n")
    if not lines or lines[0].strip() != "---":
        raise TemplateError(f"{path} line 1: a page source starts with a front matter block "
                            f"(got {lines[0][:60]!r}); begin the file with '---', the lines "
                            f"'written_for: <digest>' and 'summary: <index line>', then '---'")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise TemplateError(f"{path}: the front matter opened on line 1 is never closed; "
                            f"add a line '---' after its keys") from None
    front: dict[str, tuple[str, int]] = {}
    for i in range(1, end):
        if not lines[i].strip():
            continue
        key, sep, value = lines[i].partition(":")
        key = key.strip()
        if not sep or key not in FRONT_KEYS:
            raise TemplateError(f"{path} line {i + 1}: front matter line {lines[i]!r} is not "
                                f"'key: value' with a key among {', '.join(FRONT_KEYS)}; "
                                f"fix the key or move the line below the closing '---'")
        front[key] = (value.strip(), i + 1)
    missing = [k for k in FRONT_KEYS if k not in front]
    if missing:
        raise TemplateError(f"{path}: the front matter lacks {', '.join(missing)} (every page source "
                            f"needs {' and '.join(FRONT_KEYS)}); add the line(s) before the closing '---'")
    start = end + 1
    while start < len(lines) and not lines[start].strip():
        start += 1
    if start == len(lines) or not lines[start].startswith("# "):
        got = lines[start] if start < len(lines) else "the end of the file"
        raise TemplateError(f"{path} line {start + 1}: the body must start with the page's "
                            f"'# Title' line (got {got!r}); add one")
    return PageSource(path, front["written_for"][0], front["summary"][0], front["summary"][1],
                      "\n".join(lines[start:]), start + 1)


def _lookup(values: Mapping[str, Any], name: str) -> Any:
    """``values[a][b]...`` for the dotted ``name`` ``a.b...``.

    Raises:
        KeyError: ``(the part of the name that was not found, the names known at that level)``.
    """
    parts = name.split(".")
    value: Any = values
    for i, key in enumerate(parts):
        if isinstance(value, Mapping) and key in value:
            value = value[key]
        elif isinstance(value, Sequence) and not isinstance(value, str) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            known = (sorted(map(str, value)) if isinstance(value, Mapping)
                     else [f"0-{len(value) - 1}"] if isinstance(value, Sequence) and not isinstance(value, str) and value
                     else [])
            raise KeyError(".".join(parts[:i + 1]), known)
    return value


def _format(value: Any, spec: str) -> str:
    """``value`` through a named filter or a Python format spec (``""``: ``str(value)``)."""
    if spec in FILTERS and not isinstance(value, Pending):
        return FILTERS[spec](value)
    return format(value, spec)


def fill(template: str, values: Mapping[str, Any], where: Path, first_line: int = 1,
         used: set[str] | None = None) -> str:
    """Replace every placeholder of ``template`` by its value.

    Args:
        template: text with ``{{ name }}`` / ``{{ name | spec }}`` placeholders.
        values: name -> value (dicts for dotted names).
        where: the page source's path, for error messages.
        first_line: the line number of ``template``'s first line in that file.
        used: if given, the top-level names filled are added to it.

    Raises:
        TemplateError: an unknown name, a ``None`` value, a spec that does not apply to the
            value, a malformed placeholder or a ``{{`` / ``}}`` with no partner.
    """
    out = []
    for offset, line in enumerate(template.split("\n")):
        at = f"{where} line {first_line + offset}"

        def one(match: re.Match[str], at: str = at) -> str:
            """The text of one placeholder on this line."""
            name, _, spec = (part.strip() for part in match.group(1).partition("|"))
            if not NAME.fullmatch(name):
                raise TemplateError(f"{at}: {match.group(0)!r} is not a placeholder: write "
                                    f"{{{{ name }}}} or {{{{ name | spec }}}} with a name such as total_steps")
            try:
                value = _lookup(values, name)
            except KeyError as missing:
                part, known = missing.args
                raise TemplateError(f"{at}: unknown placeholder {match.group(0)}: the page's values have "
                                    f"no {part!r} (known there: {', '.join(known) or 'none'}); fix the name, "
                                    f"or compute it in the page's values() function") from None
            if value is None:
                raise TemplateError(f"{at}: {match.group(0)} has the value None; make values() give "
                                    f"text for a missing figure (such as '-') or leave the placeholder out")
            try:
                text = _format(value, spec)
            except (TypeError, ValueError) as err:
                raise TemplateError(f"{at}: {match.group(0)}: format {spec!r} does not apply to "
                                    f"{value!r} ({type(value).__name__}: {err}); use a spec for that type, "
                                    f"a filter among {', '.join(FILTERS)}, or none") from None
            if used is not None:
                used.add(name.split(".")[0])
            return text

        filled = PLACEHOLDER.sub(one, line)
        rest = PLACEHOLDER.sub("", line)
        if "{{" in rest or "}}" in rest:
            raise TemplateError(f"{at}: an unmatched '{{{{' or '}}}}' in {line.strip()[:80]!r}: a placeholder "
                                f"opens and closes on one line, {{{{ name }}}}")
        out.append(filled)
    return "\n".join(out)


def render_source(source: PageSource, values: Mapping[str, Any]) -> Page:
    """Fill a page source with its values: title, index summary and body.

    Raises:
        TemplateError: as :func:`fill`, or a value that no placeholder of the page uses.
    """
    used: set[str] = set()
    summary = fill(source.summary, values, source.path, source.summary_line, used)
    text = fill(source.body, values, source.path, source.body_line, used)
    unused = sorted(set(values) - used)
    if unused:
        raise TemplateError(f"{source.path}: values computed but never used: {', '.join(unused)}; "
                            f"reference each in the page ({{{{ {unused[0]} }}}}) or stop computing it "
                            f"in the page's values() function")
    title, _, body = text.partition("\n")
    return Page(title[2:].strip(), summary, body, source.written_for)
