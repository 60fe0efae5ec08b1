"""The drain's progress bar on a terminal: delivered of taken, with rate and ETA."""

from __future__ import annotations

from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from runner.store.base import Counts


class DrainProgress:
    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]draining"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> DrainProgress:
        self._progress.start()
        self._task = self._progress.add_task("drain", total=None, detail="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    async def update(self, counts: Counts) -> None:
        assert self._task is not None
        files = counts.files
        finished = sum(n for state, n in files.items() if state.startswith(("done", "delivered")))
        errors = sum(n for state, n in files.items() if state.endswith(":error"))
        total = sum(n for state, n in files.items() if state != "retried")
        detail = f"open calls {counts.open_calls}  errors {errors}"
        self._progress.update(self._task, completed=finished, total=total, detail=detail)
