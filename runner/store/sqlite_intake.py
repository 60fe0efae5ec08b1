"""Taking files into the SQLite store: each file's call found, opened, filled or closed.

A file-mode file's call is born ready; a folder's or window's collecting call is found by its key,
a full window closed and another opened. Everything a scan found is one transaction.
"""

from __future__ import annotations

import sqlite3

from runner.names import from_raw, raw
from runner.store.base import (
    BatchLimits,
    CallRow,
    KnownFile,
    NewFile,
    new_call_params,
    new_file_params,
)
from runner.store.sqlite_plumbing import QUERIES, SqlitePlumbing


class SqliteIntake(SqlitePlumbing):
    async def recover(self) -> None:
        """A POST that was in flight when the last process died has an unknown outcome; a
        call waiting for a duplicate's result looks again (a wake-up may have been lost)."""
        async with self._transaction("recover_sending") as db:
            await db.execute(QUERIES["recover_sending"])
            await db.execute(QUERIES["wake_all_waiting"])

    async def known_files(self) -> dict[str, KnownFile]:
        # on aiosqlite's thread: every file the store knows, at start-up
        rows = await self._fetch("known_files")
        return {
            from_raw(row["rel"]): KnownFile(row["size"], row["mtime_ns"], row["state"])
            for row in rows
        }

    async def add_files(
        self, files: list[NewFile], *, now: float, batch_limits: BatchLimits
    ) -> None:
        def add(db: sqlite3.Connection) -> None:
            for new in files:
                _add_file(db, new, now, batch_limits)

        await self._run_transaction("add_files", add)

    async def collecting_calls(self) -> list[CallRow]:
        # small: one call per batch still taking files
        return await self._rows(CallRow, "collecting_calls", {})

    async def close_batch(self, call_row_id: int) -> None:
        await self._write("close_batch", [{"id": call_row_id}])


def _add_file(db: sqlite3.Connection, new: NewFile, now: float, batch_limits: BatchLimits) -> None:
    destination = new.destination
    call_row_id: int | None = None
    if destination is not None and new.reason is None:
        call_row_id = _call_for(db, new, now, batch_limits)
    db.execute(QUERIES["insert_file"], new_file_params(new, call_row_id, now))


def _call_for(db: sqlite3.Connection, new: NewFile, now: float, batch_limits: BatchLimits) -> int:
    destination = new.destination
    assert destination is not None
    if destination.mode == "file":
        call_row_id = _insert_call(db, destination.workflow, "file", new.rel, "ready", now)
        db.execute(QUERIES["add_to_batch"], {"id": call_row_id, "size": new.size, "now": now})
        return call_row_id
    row = db.execute(
        QUERIES["collecting_call_by_key"], {"batch_key": raw(destination.batch_key)}
    ).fetchone()
    if row is not None and destination.batch_key in batch_limits:
        max_files, max_bytes = batch_limits[destination.batch_key]
        full = row["file_count"] >= max_files or (
            row["file_count"] > 0 and row["byte_count"] + new.size > max_bytes
        )
        if full:
            db.execute(QUERIES["close_batch"], {"id": row["id"]})
            row = None
    if row is None:
        call_row_id = _insert_call(
            db, destination.workflow, destination.mode, destination.batch_key, "collecting", now
        )
    else:
        call_row_id = int(row["id"])
    db.execute(QUERIES["add_to_batch"], {"id": call_row_id, "size": new.size, "now": now})
    return call_row_id


def _insert_call(
    db: sqlite3.Connection, workflow: str, mode: str, key: str, state: str, now: float
) -> int:
    cursor = db.execute(QUERIES["insert_call"], new_call_params(workflow, mode, key, state, now))
    assert cursor.lastrowid is not None
    return cursor.lastrowid
