"""The plain-text tables every bench script prints."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["fmt", "print_table"]


def fmt(value: float | None, digits: int = 1) -> str:
    """`value` with thousands separators, ``-`` for None or NaN."""
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = (), *, left: int = 1
) -> None:
    """A table under `title`; the first `left` columns are labels (left-aligned), the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print()
    print(title)
    print("-" * len(line))
    print(line.rstrip())
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        cells = [
            str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print(" | ".join(cells).rstrip())
    for note in notes:
        print(f"  {note}")
    sys.stdout.flush()
