"""Plain-text tables: every cell in its column, whatever the cells hold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.status import render_status
from runner.tables import table

cell = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12)


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], list[list[str]], set[str]]:
    columns = draw(st.lists(cell.filter(str.strip), min_size=1, max_size=5, unique=True))
    rows = draw(st.lists(st.lists(cell, min_size=len(columns), max_size=len(columns))))
    right = draw(st.sets(st.sampled_from(columns)))
    return columns, rows, right


@given(tables())
def test_every_cell_sits_in_its_column(shape: tuple[list[str], list[list[str]], set[str]]) -> None:
    columns, rows, right = shape
    lines = table("title", columns, rows, right=right).split("\n")
    assert lines[0] == "title"
    header, rule, *body = lines[1:]
    assert len(body) == len(rows)
    widths = [len(dashes) for dashes in rule.split("  ")]
    assert len(widths) == len(columns)
    for line, row in zip([header, *body], [columns, *rows], strict=True):
        start = 0
        for width, column, value in zip(widths, columns, row, strict=True):
            padded = line[start : start + width].ljust(width)
            expected = value.rjust(width) if column in right else value.ljust(width)
            assert padded == expected
            start += width + 2
        assert not line.endswith(" ")


def test_a_row_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="every row of 'counts' needs 2 cells"):
        table("counts", ("state", "count"), [("done", "1", "extra")])


def test_status_shows_counts_runners_and_recent_errors() -> None:
    report = {
        "runners": [],
        "files": {"done:result": 12, "done:error": 1},
        "calls": {"done": 13},
        "open_calls": 0,
        "reused": 2,
        "recent_errors": [{"file": "wf/a.txt", "reason": "file is empty", "at": None}],
    }
    text = render_status(report)
    assert "files  done:result                           12" in text
    assert "files  reused (a result copied, no call)      2" in text
    assert "runners: none has joined this store" in text
    assert "wf/a.txt  file is empty" in text
