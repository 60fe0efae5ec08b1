"""The drain's progress display on a terminal: submitted, completed, failed, rate and ETA.

The figures count this drain's work only: what the store already held as finished when the
drain started is the baseline, not progress. The CLI shows the display only on a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
)

from runner.store.base import Counts

SENT_CALL_STATES = ("polling", "terminal", "done")


@dataclass(frozen=True)
class Tally:
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
    """``with DrainProgress(console) as p:`` then ``await p.update(counts)`` per supervisor turn."""

    def __init__(self, console: Console, *, get_time: Callable[[], float] | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]draining"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "submitted {task.fields[submitted]}  completed {task.fields[results]}"
                "  failed {task.fields[failed]}"
            ),
            TextColumn("{task.fields[rate]}  ETA {task.fields[eta]}"),
            console=console,
            get_time=get_time,
            transient=False,
        )
        self._get_time = get_time or time.monotonic
        self._task: TaskID | None = None
        self._baseline: Tally | None = None
        self._started = 0.0

    def __enter__(self) -> DrainProgress:
        self._progress.start()
        self._task = self._progress.add_task(
            "drain", total=None, submitted=0, results=0, failed=0, rate="--", eta="--"
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    async def update(self, counts: Counts) -> None:
        assert self._task is not None, "use DrainProgress as a context manager"
        tally = Tally.of(counts)
        if self._baseline is None:
            self._baseline = tally
            self._started = self._get_time()
        now = tally.since(self._baseline)
        finished = now.completed + now.failed
        elapsed = self._get_time() - self._started
        rate = finished / elapsed if elapsed > 0 and finished else None
        eta = "--" if rate is None else _duration(max(0, now.total - finished) / rate)
        self._progress.update(
            self._task,
            completed=finished,
            total=max(now.total, 0),
            submitted=now.submitted,
            results=now.completed,
            failed=now.failed,
            rate="-- files/s" if rate is None else f"{rate:.1f} files/s",
            eta=eta,
        )
        self._progress.refresh()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
