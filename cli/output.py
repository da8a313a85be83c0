"""What the commands print, and where.

stdout carries results only (ids, paths, listings, tables, JSON), so a command's output can
be piped or captured; chatter (what was done, totals) goes to stderr and is silenced by
--quiet. Commands that create a version print its id alone as the last line of stdout.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import click

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(n: int | None) -> str:
    """1536 -> '1.5 KiB' (binary units, like `du -h`); None -> '-'."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def short_id(version_id: str) -> str:
    return version_id[:8]


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f]}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def shown(text: str) -> str:
    """A name as one line of a listing: control characters (a newline in a file or tag
    name) written as escapes, \\n, \\x1b, so a row stays a row and nothing steers the
    terminal. --json output keeps names exact."""
    return text.translate(_CONTROL)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
          right: Sequence[str] = ()) -> list[str]:
    """Rows as aligned text columns; columns named in `right` are right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else shown(str(c)) for c in r]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if h in right else c.ljust(w)
                 for c, w, h in zip(row, widths, headers, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return lines


def result(text: str = "") -> None:
    """One line of a command's result, on stdout."""
    click.echo(text)


def results(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)


def as_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def info(quiet: bool, text: str) -> None:
    """Chatter about what a command did, on stderr; nothing with --quiet."""
    if not quiet:
        click.echo(text, err=True)
