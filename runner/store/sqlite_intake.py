"""Taking files into the SQLite store: each file's group found, opened, filled or closed.

A file-mode file's group is born ready; a folder's or window's open group is found by its key,
a full window closed and another opened. Everything a scan found is one transaction.
"""

from __future__ import annotations

import aiosqlite

from runner.names import from_raw, raw
from runner.store.base import BatchLimits, GroupRow, KnownFile, NewFile, new_call_reference_id
from runner.store.sqlite_plumbing import QUERIES, SqlitePlumbing


class SqliteIntake(SqlitePlumbing):
    async def recover(self) -> None:
        """A POST that was in flight when the last process died has an unknown outcome; a
        group waiting for a duplicate's result looks again (a wake-up may have been lost)."""
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

    async def open_groups(self) -> list[GroupRow]:
        return await self._rows(GroupRow, "open_groups", {})

    async def close_group(self, group_id: int) -> None:
        await self._write("close_group", [{"id": group_id}])

    async def _add_file(
        self, db: aiosqlite.Connection, new: NewFile, now: float, batch_limits: BatchLimits
    ) -> None:
        destination = new.destination
        group_id: int | None = None
        if destination is not None and new.reason is None:
            group_id = await self._group_for(db, new, now, batch_limits)
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
                "group_id": group_id,
                "state": "queued" if group_id is not None else "rejected",
                "reason": new.reason,
                "seen_at": now,
            },
        )

    async def _group_for(
        self, db: aiosqlite.Connection, new: NewFile, now: float, batch_limits: BatchLimits
    ) -> int:
        destination = new.destination
        assert destination is not None
        if destination.mode == "file":
            group_id = await self._insert_group(
                db, destination.workflow, "file", new.rel, "ready", now
            )
            await db.execute(
                QUERIES["add_to_group"], {"id": group_id, "size": new.size, "now": now}
            )
            return group_id
        async with db.execute(
            QUERIES["open_group_by_key"], {"group_key": raw(destination.group_key)}
        ) as c:
            row = await c.fetchone()
        if row is not None and destination.group_key in batch_limits:
            max_files, max_bytes = batch_limits[destination.group_key]
            full = row["file_count"] >= max_files or (
                row["file_count"] > 0 and row["byte_count"] + new.size > max_bytes
            )
            if full:
                await db.execute(QUERIES["close_group"], {"id": row["id"]})
                row = None
        if row is None:
            group_id = await self._insert_group(
                db, destination.workflow, destination.mode, destination.group_key, "open", now
            )
        else:
            group_id = int(row["id"])
        await db.execute(QUERIES["add_to_group"], {"id": group_id, "size": new.size, "now": now})
        return group_id

    async def _insert_group(
        self, db: aiosqlite.Connection, workflow: str, mode: str, key: str, state: str, now: float
    ) -> int:
        cursor = await db.execute(
            QUERIES["insert_group"],
            {
                "call_reference_id": new_call_reference_id(),
                "workflow": workflow,
                "mode": mode,
                "group_key": raw(key),
                "state": state,
                "now": now,
            },
        )
        group_id = cursor.lastrowid
        await cursor.close()
        assert group_id is not None
        return group_id
