"""Plain-text tables of measured values and their ratios, as the benchmarks print them.

A ratio is ``numerator / denominator`` of two measurements of the same
workload in the same run; a missing side, or a denominator of zero, prints
``-`` rather than a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Cell", "Column", "ratio", "render_table"]

Cell = float | int | str | None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None if either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Column:
    """One column: its title, width and how its numbers are written."""

    title: str
    fmt: str = ".2f"
    width: int = 0  # 0: wide enough for the title and two spaces

    def cell(self, value: Cell) -> str:
        width = max(self.width, len(self.title) + 2)
        if value is None:
            text = "-"
        elif isinstance(value, str):
            text = value
        else:
            text = format(value, self.fmt)
        return f"{text:>{width}}"

    def head(self) -> str:
        return f"{self.title:>{max(self.width, len(self.title) + 2)}}"


def render_table(label: str, columns: Sequence[Column],
                 rows: Sequence[tuple[str, Sequence[Cell]]]) -> list[str]:
    """Lines of a table: a header, a rule, then one line per ``(row label, cells)``.

    ``label`` titles the first column (the row labels, left-aligned); each row
    has one cell per column.
    """
    first = max([len(label), *(len(name) for name, _ in rows)]) + 2
    head = f"{label:<{first}}" + "".join(c.head() for c in columns)
    lines = [head, "-" * len(head)]
    for name, cells in rows:
        if len(cells) != len(columns):
            raise ValueError(f"row {name!r} has {len(cells)} cells for {len(columns)} columns")
        lines.append(f"{name:<{first}}" + "".join(c.cell(v) for c, v in zip(columns, cells,
                                                                              strict=True)))
    return lines
