"""The SQLite store: one connection, one writer, WAL with ``synchronous=FULL``.

Every statement lives in ``queries.sql``; these classes only run them. A commit here must never
roll back behind an outbox rename that already happened, hence ``synchronous=FULL``.

- opening, the schema and its migration: :mod:`.sqlite_setup`
- statements and transactions: :mod:`.sqlite_plumbing`
- taking files into calls: :mod:`.sqlite_intake`
- content dedupe: :mod:`.sqlite_dedupe`
- webhook events: :mod:`.sqlite_webhooks`
- claims, runners and the rate budget of a store with one owner: :mod:`.single_owner`
- here: the submit, poll and deliver stages' reads and writes, and the reports
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

import anyio

from runner.errors import StoreError
from runner.names import from_raw
from runner.store.base import (
    CallRow,
    Counts,
    Delivery,
    FileRow,
    Finished,
    NextPoll,
    next_poll_params,
    rows_as,
    terminal_params,
)
from runner.store.lock import state_owner
from runner.store.single_owner import SingleOwner
from runner.store.sqlite_dedupe import SqliteDedupe, wake_duplicates
from runner.store.sqlite_intake import SqliteIntake
from runner.store.sqlite_plumbing import QUERIES
from runner.store.sqlite_setup import SCHEMA_VERSION, SqliteSetup, connect
from runner.store.sqlite_webhooks import SqliteWebhooks

__all__ = ["SCHEMA_VERSION", "SqliteStore", "open_sqlite_store"]


@asynccontextmanager
async def open_sqlite_store(path: Path, *, read_only: bool = False) -> AsyncIterator[SqliteStore]:
    """Open the state database at ``path``.

    A writer (the default) creates and migrates the database as needed and owns it while it is
    open (:func:`state_owner`): a second process is refused at once. ``read_only`` (``status``)
    reads a database that must already exist, without taking it and without creating anything.
    """
    with ExitStack() as owner:
        if not read_only:
            owner.enter_context(state_owner(path))
        store = SqliteStore(await connect(path, read_only=read_only), path, owned=not read_only)
        try:
            await (store.check_readable() if read_only else store.migrate())
            yield store
        finally:
            # closed even when the runner is cancelled, or its thread outlives the event loop
            with anyio.CancelScope(shield=True):
                await store.close()


class SqliteStore(SqliteSetup, SqliteIntake, SqliteDedupe, SqliteWebhooks, SingleOwner):
    # The stages' reads are small (``_rows``, ``_scalar``: on the event loop's thread when the
    # connection is idle): each is bounded by its LIMIT, by a batch of ids, or by the calls and
    # files in flight, and finds them through an index. The reports read the whole store and
    # take the trip to aiosqlite's thread (``_fetch``, ``_fetch_each``).

    # -- submit -----------------------------------------------------------------------------

    async def ready_calls(self, *, now: float, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "ready_calls", {"now": now, "limit": limit})

    async def call(self, call_row_id: int) -> CallRow:
        rows = await self._rows(CallRow, "call_by_id", {"id": call_row_id})
        if not rows:
            raise StoreError(f"{self._path}: no call {call_row_id}")
        return rows[0]

    async def files_of_calls(self, call_row_ids: Sequence[int]) -> dict[int, list[FileRow]]:
        """The files of many calls with one query, by call."""
        by_call: dict[int, list[FileRow]] = {gid: [] for gid in call_row_ids}
        rows = await self._rows(
            FileRow, "files_of_calls", {"call_row_ids": json.dumps(call_row_ids)}
        )
        for row in rows:
            assert row.call_row_id is not None
            by_call[row.call_row_id].append(row)
        return by_call

    async def supersede_file(self, file: FileRow) -> None:
        """The file changed after it was queued: drop it from its call; it will be taken anew."""

        def supersede(db: sqlite3.Connection) -> None:
            db.execute(QUERIES["supersede_file"], {"id": file.id})
            _shrink_call(db, file)
            wake_duplicates(db, [file.id])

        await self._run_transaction("supersede_file", supersede)

    async def reject_queued_file(self, file: FileRow, reason: str) -> None:
        def reject(db: sqlite3.Connection) -> None:
            db.execute(QUERIES["reject_file"], {"id": file.id, "reason": reason})
            _shrink_call(db, file)

        await self._run_transaction("reject_file", reject)

    async def drop_empty_call(self, call_row_id: int) -> None:
        await self._write("drop_empty_call", [{"id": call_row_id}])

    async def mark_sending(self, call_row_ids: list[int], *, now: float) -> None:
        await self._write("mark_sending", ({"id": gid, "now": now} for gid in call_row_ids))

    async def mark_submitted(
        self, call_row_id: int, *, call_id: str, status: str | None, now: float, next_poll: float
    ) -> None:
        row = {
            "id": call_row_id,
            "call_id": call_id,
            "status": status,
            "now": now,
            "next_poll": next_poll,
        }
        await self._write_together("mark_submitted", row)

    async def mark_submit_later(self, call_row_ids: list[int], *, not_before: float) -> None:
        await self._write(
            "mark_submit_later", ({"id": gid, "not_before": not_before} for gid in call_row_ids)
        )

    async def mark_unknown(self, call_row_ids: list[int], *, not_before: float) -> None:
        await self._write(
            "mark_unknown", ({"id": gid, "not_before": not_before} for gid in call_row_ids)
        )

    async def mark_terminal(self, finished: Sequence[Finished], *, now: float) -> None:
        await self.record_polls(finished, [], now=now)

    async def record_polls(
        self, finished: Sequence[Finished], next_polls: Sequence[NextPoll], *, now: float
    ) -> None:
        """Calls that ended and the next poll of the others, in one transaction."""
        if not finished:
            await self.reschedule_polls(next_polls)
            return
        terminal = terminal_params(finished, now)
        rescheduled = next_poll_params(next_polls)

        def record(db: sqlite3.Connection) -> None:
            db.executemany(QUERIES["mark_terminal"], terminal)
            db.executemany(QUERIES["reschedule_poll"], rescheduled)

        await self._run_transaction("mark_terminal", record)

    # -- poll -------------------------------------------------------------------------------

    async def due_polls(self, *, now: float, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "due_polls", {"now": now, "limit": limit})

    async def reschedule_polls(self, next_polls: Sequence[NextPoll]) -> None:
        if next_polls:
            await self._write("reschedule_poll", next_poll_params(next_polls))

    async def due_unknown(self, *, now: float, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "due_unknown", {"now": now, "limit": limit})

    async def next_poll_due(self) -> float | None:
        value = await self._scalar("next_poll_due")
        return float(value) if value is not None else None

    async def next_submit_due(self) -> float | None:
        """When the next ready or unknown call is due (an unknown one is listed, not sent)."""
        value = await self._scalar("next_submit_due")
        return float(value) if value is not None else None

    # -- deliver ----------------------------------------------------------------------------

    async def terminal_calls(self, *, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "terminal_calls", {"limit": limit})

    async def rejected_files(self, *, limit: int) -> list[FileRow]:
        return await self._rows(FileRow, "rejected_files", {"limit": limit})

    async def delivered_files(self, *, limit: int) -> list[FileRow]:
        return await self._rows(FileRow, "delivered_files", {"limit": limit})

    async def mark_delivered(
        self, deliveries: Sequence[Delivery], *, finished_calls: Sequence[int], now: float
    ) -> None:
        """Files whose documents are written; calls with no file left to deliver are done."""
        delivered = [
            {"id": d.file_id, "outcome": d.outcome, "reason": d.reason, "now": now}
            for d in deliveries
        ]
        done = [{"id": g} for g in finished_calls]
        file_ids = [d.file_id for d in deliveries]

        def record(db: sqlite3.Connection) -> None:
            db.executemany(QUERIES["mark_delivered"], delivered)
            db.executemany(QUERIES["mark_call_done"], done)
            wake_duplicates(db, file_ids)

        await self._run_transaction("mark_delivered", record)

    async def mark_done(self, file_ids: Sequence[int], *, now: float) -> None:
        if file_ids:
            await self._write("mark_done", ({"id": fid, "now": now} for fid in file_ids))

    # -- reports ----------------------------------------------------------------------------

    async def counts(self) -> Counts:
        # read each time the supervisor turns: one trip for all four, on aiosqlite's thread as
        # the file counts read an index of every file
        by_file, by_call, open_calls, reused = await self._fetch_each(
            ("count_files", "count_calls", "open_call_count", "count_reused")
        )
        files: dict[str, int] = {}
        for state, outcome, count in by_file:
            key = f"{state}:{outcome}" if state in ("delivered", "done") and outcome else state
            files[key] = files.get(key, 0) + count
        return Counts(
            files=files,
            calls={state: count for state, count in by_call},
            open_calls=open_calls[0][0],  # a count: always one row
            reused=reused[0][0],
        )

    async def open_call_count(self) -> int:
        return int(await self._scalar("open_call_count") or 0)

    async def unfinished_work(self) -> int:
        # on aiosqlite's thread: it counts the calls through an index of every call
        rows = await self._fetch("unfinished_work")
        return int(rows[0][0])  # a count: always one row

    async def recent_errors(self, *, limit: int) -> list[tuple[str, str | None, float | None]]:
        # on aiosqlite's thread: it sorts every error the store holds (for ``status``)
        return [
            (from_raw(r["rel"]), r["reason"], r["done_at"])
            for r in await self._fetch("recent_errors", {"limit": limit})
        ]

    async def failed_files(self) -> list[FileRow]:
        # on aiosqlite's thread: every failed file of the store (``retry``)
        return rows_as(FileRow, await self._fetch("failed_files"))

    async def mark_retried(self, file_ids: list[int]) -> None:
        await self._write("supersede_file", ({"id": fid} for fid in file_ids))


def _shrink_call(db: sqlite3.Connection, file: FileRow) -> None:
    if file.call_row_id is not None:
        db.execute(QUERIES["shrink_call"], {"id": file.call_row_id, "size": file.size})
