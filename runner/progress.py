"""The drain's progress display on a terminal: submitted, completed, failed, rate and ETA.

The figures count this drain's work only: what the store already held as finished when the
drain started is the baseline, not progress. The CLI shows the display only on a terminal.

The display is one line at the bottom of the terminal, drawn again in place. While it is shown,
``sys.stderr`` stands in for the terminal so that each log line goes above it, not through it.
"""

from __future__ import annotations

import io
import shutil
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

import msgspec

from runner.store.base import Counts

SENT_CALL_STATES = ("polling", "terminal", "done")
# Back to the line's start and erase it (ECMA-48 "erase in line", whole line).
ERASE_LINE = "\r\x1b[2K"
BAR_WIDTH = 30


class Tally(msgspec.Struct, frozen=True):
    """Files and calls as the display counts them."""

    total: int
    completed: int
    failed: int
    submitted: int
    """Calls bem accepted."""

    @classmethod
    def of(cls, counts: Counts) -> Tally:
        files = counts.files
        return cls(
            total=sum(n for state, n in files.items() if state != "retried"),
            completed=sum(n for state, n in files.items() if state.endswith(":result")),
            failed=sum(n for state, n in files.items() if state.endswith(":error")),
            submitted=sum(counts.calls.get(state, 0) for state in SENT_CALL_STATES),
        )

    def since(self, baseline: Tally) -> Tally:
        return Tally(
            total=self.total - baseline.completed - baseline.failed,
            completed=self.completed - baseline.completed,
            failed=self.failed - baseline.failed,
            submitted=self.submitted - baseline.submitted,
        )


class DrainProgress:
    """``with DrainProgress(terminal) as p:`` then ``await p.update(counts)`` per supervisor turn.

    The line: a bar, finished of total, then what was submitted, completed and failed, the rate
    and the time left, cut to the terminal's width so that it never wraps. Rate and time left
    are this drain's files finished per second of ``get_time``, so a test drives them.
    """

    def __init__(
        self,
        terminal: TextIO,
        *,
        get_time: Callable[[], float] | None = None,
        get_width: Callable[[], int] = lambda: shutil.get_terminal_size().columns,
    ) -> None:
        self._terminal = terminal
        self._get_time = get_time or time.monotonic
        self._get_width = get_width
        self._baseline: Tally | None = None
        self._started = 0.0
        self._line = ""
        self._unfinished = ""
        self._stderr: TextIO | None = None
        # A log line may come from a worker thread while the loop draws the progress line.
        self._writing = threading.Lock()

    def __enter__(self) -> DrainProgress:
        self._stderr = sys.stderr
        sys.stderr = _AboveTheLine(self, self._terminal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stderr is not None
        sys.stderr = self._stderr
        if self._unfinished:
            self.write_above("\n")
        if self._line:
            self._terminal.write("\n")
            self._terminal.flush()

    async def update(self, counts: Counts) -> None:
        tally = Tally.of(counts)
        if self._baseline is None:
            self._baseline = tally
            self._started = self._get_time()
        now = tally.since(self._baseline)
        finished = now.completed + now.failed
        total = max(now.total, finished)
        elapsed = self._get_time() - self._started
        rate = finished / elapsed if elapsed > 0 and finished else None
        eta = "--" if rate is None else _duration(max(0, total - finished) / rate)
        filled = BAR_WIDTH * finished // total if total else 0
        line = (
            f"draining [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {finished}/{total}"
            f"  submitted {now.submitted}  completed {now.completed}  failed {now.failed}  "
            + ("-- files/s" if rate is None else f"{rate:.1f} files/s")
            + f"  ETA {eta}"
        )
        with self._writing:
            self._line = line
            self._draw()

    def write_above(self, text: str) -> None:
        """Each line of ``text`` (log lines) above the progress line, which is drawn again
        below them; a line's start waits for its end (``print`` writes the newline apart)."""
        with self._writing:
            lines, newline, self._unfinished = (self._unfinished + text).rpartition("\n")
            if newline:
                self._terminal.write(ERASE_LINE + lines + newline)
                self._draw()

    def _draw(self) -> None:
        # One column short of the width: a line that fills the last column wraps on some terminals.
        self._terminal.write(ERASE_LINE + self._line[: max(self._get_width() - 1, 0)])
        self._terminal.flush()


class _AboveTheLine(io.TextIOBase):
    """``sys.stderr`` while the progress line is shown."""

    def __init__(self, progress: DrainProgress, terminal: TextIO) -> None:
        super().__init__()
        self._progress = progress
        self._terminal = terminal

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._progress.write_above(text)
        return len(text)

    def flush(self) -> None:
        self._terminal.flush()

    def isatty(self) -> bool:
        return self._terminal.isatty()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
