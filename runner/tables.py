"""Plain-text tables for the terminal (``status``, ``status``'s live figures): a title, a header,
a rule and the rows, each column as wide as its widest cell."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: Collection[str] = (),
) -> str:
    """The table as lines; the columns named in ``right`` are aligned right (numbers)."""
    cells = [list(columns), *([str(cell) for cell in row] for row in rows)]
    if any(len(row) != len(columns) for row in cells):
        raise ValueError(f"every row of {title!r} needs {len(columns)} cells")
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    flush_right = [column in right for column in columns]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if at_right else cell.ljust(width)
            for cell, width, at_right in zip(row, widths, flush_right, strict=True)
        ).rstrip(" ")

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([title, line(cells[0]), rule, *(line(row) for row in cells[1:])])
