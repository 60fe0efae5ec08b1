"""The SQLite store: one connection, one writer, WAL with ``synchronous=FULL``.

Every statement lives in ``queries.sql``; this class only runs them. A commit here must never
roll back behind an outbox rename that already happened, hence ``synchronous=FULL``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio

from runner import faults
from runner.errors import StoreError
from runner.names import from_raw, raw
from runner.store.base import (
    BatchLimits,
    CallRow,
    Counts,
    Delivery,
    EventRecorded,
    FileRow,
    Finished,
    KnownFile,
    NewFile,
    NextPoll,
    WebhookEvent,
)
from runner.store.lock import state_owner
from runner.store.named_sql import load_queries
from runner.store.single_owner import SingleOwner
from runner.store.sqlite_dedupe import SqliteDedupe

SCHEMA_VERSION = 5
Row = TypeVar("Row", CallRow, FileRow)


QUERIES = load_queries("queries.sql")
MIGRATIONS: dict[int, str] = {
    1: QUERIES["schema_1"],
    2: QUERIES["schema_2"],
    3: QUERIES["schema_3"],
    4: QUERIES["schema_4"],
    5: QUERIES["schema_5"],
}
_NAME_COLUMNS = ("rel", "batch_key")
"""Columns that hold a file-system name: its exact bytes in the database (see names.py)."""


def new_call_reference_id() -> str:
    return f"bemr-{uuid.uuid4().hex}"


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
        store = SqliteStore(await _connect(path, read_only=read_only), path, owned=not read_only)
        try:
            await (store.check_readable() if read_only else store.migrate())
            yield store
        finally:
            # closed even when the runner is cancelled, or its thread outlives the event loop
            with anyio.CancelScope(shield=True):
                await store.close()


async def _connect(path: Path, *, read_only: bool) -> aiosqlite.Connection:
    if read_only and not path.is_file():  # noqa: ASYNC240 (one stat, at startup)
        raise StoreError(f"{path}: no state database here (check --state / paths.state)")
    if read_only:
        target, uri = f"file:{urllib.parse.quote(os.fsencode(path))}?mode=ro", True
    else:
        target, uri = str(path), False
    try:
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        # shielded: a connection cancelled half-way would leave its thread running
        with anyio.CancelScope(shield=True):
            connection = await aiosqlite.connect(target, isolation_level=None, uri=uri)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{path}: cannot open state database: {exc}") from exc
    return connection


class SqliteStore(SqliteDedupe, SingleOwner):
    def __init__(self, connection: aiosqlite.Connection, path: Path, *, owned: bool = True) -> None:
        self._db = connection
        self._path = path
        self.owned = owned
        """This process owns the state (a writer); False when it only reads it."""
        self._writer = anyio.Lock()  # one connection, so one transaction at a time

    # -- plumbing ---------------------------------------------------------------------------

    async def _fetch(self, name: str, params: Mapping[str, Any] | None = None) -> list[sqlite3.Row]:
        try:
            async with self._db.execute(QUERIES[name], params or {}) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"{self._path}: {name}: {exc}") from exc

    async def _scalar(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        rows = await self._fetch(name, params)
        return rows[0][0] if rows else None

    @asynccontextmanager
    async def _transaction(self, label: str) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; ``label`` names it for the crash points."""
        async with self._writer:
            # Once begun, a transaction runs to its commit or rollback: a BEGIN or statement
            # cancelled half-way would still run in aiosqlite's thread and leave the shared
            # connection inside a transaction nobody owns.
            with anyio.CancelScope(shield=True):
                try:
                    await self._db.execute("BEGIN IMMEDIATE")
                    try:
                        yield self._db
                    except BaseException:
                        await self._db.execute("ROLLBACK")
                        raise
                    faults.point("store.before_commit", label)
                    await self._db.execute("COMMIT")
                    faults.point("store.after_commit", label)
                except sqlite3.Error as exc:
                    raise StoreError(f"{self._path}: {exc}") from exc

    async def _write(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        async with self._transaction(name) as db:
            await db.executemany(QUERIES[name], list(rows))

    async def _rows(self, cls: type[Row], name: str, params: Mapping[str, Any]) -> list[Row]:
        names = [f.name for f in fields(cls)]
        rows = await self._fetch(name, params)
        return [cls(**{key: _column(key, row[key]) for key in names}) for row in rows]

    async def migrate(self) -> None:
        self._db.row_factory = sqlite3.Row
        try:
            await self._db.executescript(QUERIES["pragmas"])
            mode = await self._scalar_raw("PRAGMA journal_mode")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self._path}: not a bem-runner state database: {exc}") from exc
        if str(mode).lower() != "wal":
            raise StoreError(f"{self._path}: cannot switch the database to WAL mode")
        if await self._scalar("has_meta_table"):
            version = int(await self._scalar("schema_version") or 0)
        elif await self._scalar("table_count"):
            raise StoreError(f"{self._path}: not a bem-runner state database (unknown tables)")
        else:
            version = 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self._path}: schema version {version} is newer than this bem-runner "
                f"({SCHEMA_VERSION}); upgrade bem-runner"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            async with self._transaction(f"schema_{target}") as db:
                for statement in MIGRATIONS[target].split(";\n"):
                    if statement.strip():
                        await db.execute(statement)

    async def check_readable(self) -> None:
        """A read-only open: the database must be a bem-runner state this version can read."""
        self._db.row_factory = sqlite3.Row
        try:
            has_meta = await self._scalar_raw(QUERIES["has_meta_table"])
            version = int(await self._scalar("schema_version") or 0) if has_meta else None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self._path}: not a bem-runner state database: {exc}") from exc
        if version is None:
            raise StoreError(f"{self._path}: not a bem-runner state database")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self._path}: schema version {version} is newer than this bem-runner "
                f"({SCHEMA_VERSION}); upgrade bem-runner"
            )

    async def _scalar_raw(self, sql: str) -> Any:
        async with self._db.execute(sql) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def integrity_check(self) -> str:
        return str(await self._scalar_raw("PRAGMA integrity_check"))

    async def close(self) -> None:
        await self._db.close()

    # -- intake -----------------------------------------------------------------------------

    async def recover(self) -> None:
        """A POST that was in flight when the last process died has an unknown outcome; a
        call waiting for a duplicate's result looks again (a wake-up may have been lost)."""
        async with self._transaction("recover_sending") as db:
            await db.execute(QUERIES["recover_sending"])
            await db.execute(QUERIES["wake_all_waiting"])

    async def known_files(self) -> dict[str, KnownFile]:
        rows = await self._fetch("known_files")
        return {
            from_raw(row["rel"]): KnownFile(row["size"], row["mtime_ns"], row["state"])
            for row in rows
        }

    async def add_files(
        self, files: list[NewFile], *, now: float, batch_limits: BatchLimits
    ) -> None:
        async with self._transaction("add_files") as db:
            for new in files:
                await self._add_file(db, new, now, batch_limits)

    async def _add_file(
        self, db: aiosqlite.Connection, new: NewFile, now: float, batch_limits: BatchLimits
    ) -> None:
        destination = new.destination
        call_row_id: int | None = None
        if destination is not None and new.reason is None:
            call_row_id = await self._call_for(db, new, now, batch_limits)
        await db.execute(
            QUERIES["insert_file"],
            {
                "rel": raw(new.rel),
                "size": new.size,
                "mtime_ns": new.mtime_ns,
                "sha256": new.sha256,
                "input_type": new.input_type,
                "workflow": destination.workflow if destination else None,
                "item_reference_id": destination.item_reference_id if destination else None,
                "call_row_id": call_row_id,
                "state": "queued" if call_row_id is not None else "rejected",
                "reason": new.reason,
                "seen_at": now,
            },
        )

    async def _call_for(
        self, db: aiosqlite.Connection, new: NewFile, now: float, batch_limits: BatchLimits
    ) -> int:
        destination = new.destination
        assert destination is not None
        if destination.mode == "file":
            call_row_id = await self._insert_call(
                db, destination.workflow, "file", new.rel, "ready", now
            )
            await db.execute(
                QUERIES["add_to_batch"], {"id": call_row_id, "size": new.size, "now": now}
            )
            return call_row_id
        async with db.execute(
            QUERIES["collecting_call_by_key"], {"batch_key": raw(destination.batch_key)}
        ) as c:
            row = await c.fetchone()
        if row is not None and destination.batch_key in batch_limits:
            max_files, max_bytes = batch_limits[destination.batch_key]
            full = row["file_count"] >= max_files or (
                row["file_count"] > 0 and row["byte_count"] + new.size > max_bytes
            )
            if full:
                await db.execute(QUERIES["close_batch"], {"id": row["id"]})
                row = None
        if row is None:
            call_row_id = await self._insert_call(
                db, destination.workflow, destination.mode, destination.batch_key, "collecting", now
            )
        else:
            call_row_id = int(row["id"])
        await db.execute(QUERIES["add_to_batch"], {"id": call_row_id, "size": new.size, "now": now})
        return call_row_id

    async def _insert_call(
        self, db: aiosqlite.Connection, workflow: str, mode: str, key: str, state: str, now: float
    ) -> int:
        cursor = await db.execute(
            QUERIES["insert_call"],
            {
                "call_reference_id": new_call_reference_id(),
                "workflow": workflow,
                "mode": mode,
                "batch_key": raw(key),
                "state": state,
                "now": now,
            },
        )
        call_row_id = cursor.lastrowid
        await cursor.close()
        assert call_row_id is not None
        return call_row_id

    async def collecting_calls(self) -> list[CallRow]:
        return await self._rows(CallRow, "collecting_calls", {})

    async def close_batch(self, call_row_id: int) -> None:
        await self._write("close_batch", [{"id": call_row_id}])

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
        async with self._transaction("supersede_file") as db:
            await db.execute(QUERIES["supersede_file"], {"id": file.id})
            if file.call_row_id is not None:
                await db.execute(
                    QUERIES["shrink_call"], {"id": file.call_row_id, "size": file.size}
                )
            await self._wake_duplicates(db, [file.id])

    async def reject_queued_file(self, file: FileRow, reason: str) -> None:
        async with self._transaction("reject_file") as db:
            await db.execute(QUERIES["reject_file"], {"id": file.id, "reason": reason})
            if file.call_row_id is not None:
                await db.execute(
                    QUERIES["shrink_call"], {"id": file.call_row_id, "size": file.size}
                )

    async def drop_empty_call(self, call_row_id: int) -> None:
        await self._write("drop_empty_call", [{"id": call_row_id}])

    async def mark_sending(self, call_row_ids: list[int], *, now: float) -> None:
        await self._write("mark_sending", ({"id": gid, "now": now} for gid in call_row_ids))

    async def mark_submitted(
        self, call_row_id: int, *, call_id: str, status: str | None, now: float, next_poll: float
    ) -> None:
        await self._write(
            "mark_submitted",
            [
                {
                    "id": call_row_id,
                    "call_id": call_id,
                    "status": status,
                    "now": now,
                    "next_poll": next_poll,
                }
            ],
        )

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
        async with self._transaction("mark_terminal") as db:
            await db.executemany(
                QUERIES["mark_terminal"],
                [
                    {
                        "id": f.call_row_id,
                        "status": f.status,
                        "result_json": f.result_json,
                        "error_reason": f.error_reason,
                        "now": now,
                    }
                    for f in finished
                ],
            )
            await db.executemany(QUERIES["reschedule_poll"], _next_poll_rows(next_polls))

    # -- poll -------------------------------------------------------------------------------

    async def due_polls(self, *, now: float, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "due_polls", {"now": now, "limit": limit})

    async def reschedule_polls(self, next_polls: Sequence[NextPoll]) -> None:
        if next_polls:
            await self._write("reschedule_poll", _next_poll_rows(next_polls))

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
        async with self._transaction("mark_delivered") as db:
            await db.executemany(
                QUERIES["mark_delivered"],
                [
                    {"id": d.file_id, "outcome": d.outcome, "reason": d.reason, "now": now}
                    for d in deliveries
                ],
            )
            await db.executemany(QUERIES["mark_call_done"], [{"id": g} for g in finished_calls])
            await self._wake_duplicates(db, [d.file_id for d in deliveries])

    async def mark_done(self, file_ids: Sequence[int], *, now: float) -> None:
        if file_ids:
            await self._write("mark_done", ({"id": fid, "now": now} for fid in file_ids))

    # -- webhooks ---------------------------------------------------------------------------

    async def record_webhook_event(
        self, event: WebhookEvent, *, now: float, confirm_at: float
    ) -> EventRecorded:
        """Record ``event`` once (by eventID); mark its call for confirmation by ``confirm_at``.

        An event whose call is not known yet stays pending for :meth:`claim_webhook_events`.
        """
        async with self._transaction("record_webhook_event") as db:
            cursor = await db.execute(
                QUERIES["insert_webhook_event"],
                {
                    "event_id": event.event_id,
                    "event_type": event.event_type,
                    "call_id": event.call_id,
                    "reference_id": event.reference_id,
                    "now": now,
                },
            )
            inserted = cursor.rowcount
            await cursor.close()
            if inserted == 0:
                return EventRecorded(duplicate=True, call_row_id=None, submitted_at=None)
            if event.call_id is None:
                return EventRecorded(duplicate=False, call_row_id=None, submitted_at=None)
            async with db.execute(QUERIES["call_row_of_call"], {"call_id": event.call_id}) as c:
                call = await c.fetchone()
            if call is None:
                return EventRecorded(duplicate=False, call_row_id=None, submitted_at=None)
            await db.execute(
                QUERIES["match_webhook_event"],
                {"event_id": event.event_id, "call_row_id": call["id"]},
            )
            if call["state"] != "polling":
                return EventRecorded(duplicate=False, call_row_id=None, submitted_at=None)
            await db.execute(
                QUERIES["mark_for_confirmation"],
                {"id": call["id"], "now": now, "confirm_at": confirm_at},
            )
            return EventRecorded(
                duplicate=False, call_row_id=int(call["id"]), submitted_at=call["submitted_at"]
            )

    async def claim_webhook_events(
        self,
        call_row_id: int,
        *,
        call_id: str,
        call_reference_id: str,
        now: float,
        confirm_at: float,
    ) -> int:
        """Pending events of a call just recorded (by callID or callReferenceID): marked for
        confirmation by ``confirm_at``. How many there were."""
        async with self._transaction("claim_webhook_events") as db:
            cursor = await db.execute(
                QUERIES["claim_webhook_events"],
                {
                    "call_row_id": call_row_id,
                    "call_id": call_id,
                    "call_reference_id": call_reference_id,
                },
            )
            claimed = cursor.rowcount
            await cursor.close()
            if claimed:
                await db.execute(
                    QUERIES["mark_for_confirmation"],
                    {"id": call_row_id, "now": now, "confirm_at": confirm_at},
                )
        return max(0, claimed)

    async def expire_webhook_events(self, *, received_before: float, purge_before: float) -> int:
        """Pending events older than ``received_before`` are dropped (their calls are not this
        runner's); settled ones older than ``purge_before`` are forgotten. How many dropped."""
        async with self._transaction("expire_webhook_events") as db:
            cursor = await db.execute(QUERIES["expire_webhook_events"], {"before": received_before})
            dropped = cursor.rowcount
            await cursor.close()
            await db.execute(QUERIES["purge_webhook_events"], {"before": purge_before})
        return max(0, dropped)

    async def webhook_event_counts(self) -> dict[str, int]:
        """Recorded events by state: pending, matched, dropped."""
        return {state: count for state, count in await self._fetch("count_webhook_events")}

    # -- reports ----------------------------------------------------------------------------

    async def counts(self) -> Counts:
        files: dict[str, int] = {}
        for state, outcome, count in await self._fetch("count_files"):
            key = f"{state}:{outcome}" if state in ("delivered", "done") and outcome else state
            files[key] = files.get(key, 0) + count
        calls = {state: count for state, count in await self._fetch("count_calls")}
        return Counts(
            files=files,
            calls=calls,
            open_calls=await self.open_call_count(),
            reused=int(await self._scalar("count_reused") or 0),
        )

    async def open_call_count(self) -> int:
        return int(await self._scalar("open_call_count") or 0)

    async def unfinished_work(self) -> int:
        return int(await self._scalar("unfinished_work") or 0)

    async def recent_errors(self, *, limit: int) -> list[tuple[str, str | None, float | None]]:
        return [
            (from_raw(r["rel"]), r["reason"], r["done_at"])
            for r in await self._fetch("recent_errors", {"limit": limit})
        ]

    async def failed_files(self) -> list[FileRow]:
        return await self._rows(FileRow, "failed_files", {})

    async def mark_retried(self, file_ids: list[int]) -> None:
        await self._write("supersede_file", ({"id": fid} for fid in file_ids))


def _column(key: str, value: Any) -> Any:
    return from_raw(value) if key in _NAME_COLUMNS and isinstance(value, bytes) else value


def _next_poll_rows(next_polls: Sequence[NextPoll]) -> list[dict[str, Any]]:
    return [
        {
            "id": n.call_row_id,
            "not_before": n.not_before,
            "status": n.status,
            "seen_event_at": n.seen_event_at,
        }
        for n in next_polls
    ]
