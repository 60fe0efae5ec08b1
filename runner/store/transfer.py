"""``bem-runner store migrate``: a SQLite state copied into an empty PostgreSQL store.

Every row keeps its id, so open calls keep their callIDs and callReferenceIDs (nothing is sent
again: a call in flight is polled, an unknown outcome is still resolved by listing), files keep
their exact byte names, and webhook events and content-dedupe facts come along. The copy is one
transaction: a failed one leaves the target as empty as it was.

The source is opened read-only and never written; its owner lock is held meanwhile, so a runner
still working on it is refused rather than copied half-way. A POST that was in flight when its
runner died (``sending``) is copied as ``unknown``, as that runner's restart would have made it.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg

from runner.errors import StoreError
from runner.names import raw
from runner.store.lock import state_owner
from runner.store.named_sql import load_queries
from runner.store.postgres_plumbing import Connection, _clean
from runner.store.postgres_setup import connect, disown, migrate, own
from runner.store.postgres_target import Target, connect_kwargs
from runner.store.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION

QUERIES = load_queries("transfer_queries.sql")
BATCH_ROWS = 1000
"""Rows read from the source and sent to the target at a time."""
CALL_COLUMNS = (
    "id", "call_reference_id", "workflow", "mode", "batch_key", "state", "opened_at",
    "last_added_at", "file_count", "byte_count", "not_before", "attempts", "sent_at",
    "submitted_at", "call_id", "status", "result_json", "error_reason", "finished_at", "event_at",
    "reused_file_id",
)  # fmt: skip
FILE_COLUMNS = (
    "id", "rel", "size", "mtime_ns", "sha256", "input_type", "workflow", "item_reference_id",
    "call_row_id", "state", "outcome", "reason", "seen_at", "delivered_at", "done_at",
)  # fmt: skip
EVENT_COLUMNS = (
    "event_id", "event_type", "call_id", "reference_id", "state", "call_row_id", "received_at",
)  # fmt: skip
NAME_COLUMNS = ("rel", "batch_key")
OPEN_STATES = ("sending", "unknown", "polling")
NOT_SENT_STATES = ("collecting", "ready", "waiting")
OLD_COLUMN_NAMES = {"batch_key": "group_key", "call_row_id": "group_id"}  # an older schema's name
"""Columns of a state from before its unit was named a call, by their names today."""
CALL_TABLES = {"calls", "groups"}  # an older schema's name


class Copied(msgspec.Struct, frozen=True):
    """What a migrate copied: calls and files by state, webhook events; and where to."""

    into: str
    """The target as messages show it (never its password)."""
    calls: Mapping[str, int]
    files: Mapping[str, int]
    reused: int
    """Files whose document is a copy of an earlier result (content dedupe): no call."""
    webhook_events: int
    in_flight_made_unknown: int
    """Calls whose POST was in flight when the source's runner stopped: copied as unknown."""

    def summary(self) -> str:
        calls = sum(self.calls.values())
        open_calls = sum(self.calls.get(s, 0) for s in OPEN_STATES)
        not_sent = sum(self.calls.get(s, 0) for s in NOT_SENT_STATES)
        finished = calls - open_calls - not_sent
        lines = [
            f"calls: {calls} ({open_calls} open, {not_sent} not sent yet, {finished} finished)",
            f"files: {sum(self.files.values())} ("
            + ", ".join(f"{n} {state}" for state, n in sorted(self.files.items()))
            + ")",
            f"results reused (content dedupe, no call): {self.reused}",
            f"webhook events: {self.webhook_events}",
        ]
        if self.in_flight_made_unknown:
            lines.append(
                f"{self.in_flight_made_unknown} call(s) whose POST was in flight are unknown: "
                "they are resolved by listing, never sent again"
            )
        return "\n".join(lines)


async def migrate_state(source: Path, url: str, *, environ: Mapping[str, str]) -> Copied:
    """Copy the SQLite state at ``source`` into the empty PostgreSQL store at ``url``."""
    if not source.is_file():  # noqa: ASYNC240 (one stat, before anything else)
        raise StoreError(f"{source}: no state database here (give --from the state file)")
    with state_owner(source):
        database = _open_source(source)
        try:
            columns = _source_columns(database, source)
            target = Target.from_url(url, environ)
            conn = await connect(target, connect_kwargs(target))
            try:
                await migrate(conn, target)
                await own(conn, target)
                try:
                    return await _copy(database, columns, conn, target, source)
                finally:
                    await disown(conn)
            finally:
                await conn.close()
        finally:
            database.close()


def _open_source(path: Path) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(os.fsencode(path))}?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open the state database: {exc}") from exc


def _source_columns(database: sqlite3.Connection, path: Path) -> dict[str, set[str]]:
    """The source's tables and their columns, once it is known to be a state this can read."""
    try:
        tables = {
            row[0]
            for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not {"meta", "files"} <= tables or tables.isdisjoint(CALL_TABLES):
            raise StoreError(f"{path}: not a bem-runner state database")
        row = database.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        columns = {
            table: {info[1] for info in database.execute(f"PRAGMA table_info({table})")}
            for table in tables
        }
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a bem-runner state database: {exc}") from exc
    version = int(row[0]) if row else 0
    if not 1 <= version <= SQLITE_SCHEMA_VERSION:
        raise StoreError(
            f"{path}: state schema version {version}; this bem-runner reads 1 to "
            f"{SQLITE_SCHEMA_VERSION}"
        )
    return columns


async def _copy(
    database: sqlite3.Connection,
    columns: Mapping[str, set[str]],
    conn: Connection,
    target: Target,
    source: Path,
) -> Copied:
    calls: Counter[str] = Counter()
    files: Counter[str] = Counter()
    events = unknown = 0
    reused: list[dict[str, Any]] = []
    try:
        async with conn.transaction():
            await _refuse_unless_empty(conn, target)
            calls_table = "calls" if "calls" in columns else "groups"  # an older schema's name
            async for batch in _read(database, calls_table, CALL_COLUMNS, columns, source):
                for row in batch:
                    if row["state"] == "open":  # an older schema's name
                        row["state"] = "collecting"
                    if row["state"] == "sending":
                        row.update(state="unknown", not_before=0.0)
                        unknown += 1
                    if row["reused_file_id"] is None:
                        calls[row["state"]] += 1
                    else:  # no call was made: its document is a copy of an earlier result
                        reused.append({"id": row["id"], "reused_file_id": row["reused_file_id"]})
                await _insert(conn, "insert_call", batch)
            async for batch in _read(database, "files", FILE_COLUMNS, columns, source):
                files.update(row["state"] for row in batch)
                await _insert(conn, "insert_file", batch)
            await _insert(conn, "set_reused_file", reused)
            if "webhook_events" in columns:
                async for batch in _read(
                    database, "webhook_events", EVENT_COLUMNS, columns, source
                ):
                    events += len(batch)
                    await _insert(conn, "insert_webhook_event", batch)
            await conn.execute(QUERIES["advance_call_row_ids"])
            await conn.execute(QUERIES["advance_file_ids"])
    except psycopg.Error as exc:
        raise StoreError(f"{target.shown}: cannot copy: {target.scrub(str(exc))}") from None
    return Copied(target.shown, dict(calls), dict(files), len(reused), events, unknown)


async def _refuse_unless_empty(conn: Connection, target: Target) -> None:
    cursor = await conn.execute(QUERIES["store_rows"])
    row = await cursor.fetchone()
    assert row is not None
    calls, files, events, runners = row
    if runners:
        raise StoreError(
            f"{target.shown}: {runners} runner(s) have joined this store; stop them (and let "
            "their leases pass) before migrating into it"
        )
    if calls or files or events:
        raise StoreError(
            f"{target.shown}: the store is not empty ({files} files, {calls} calls, {events} "
            "webhook events); migrate copies a state only into an empty store"
        )


async def _read(
    database: sqlite3.Connection,
    table: str,
    wanted: Sequence[str],
    columns: Mapping[str, set[str]],
    source: Path,
) -> AsyncIterator[list[dict[str, Any]]]:
    """The rows of ``table`` as dicts of ``wanted``, in batches; a column an older schema lacks
    reads None, a name an old schema kept as text reads as its bytes."""
    present = columns[table]
    selected = ", ".join(_column(name, present) for name in wanted)
    order = "id" if "id" in present else "rowid"
    try:
        cursor = database.execute(f"SELECT {selected} FROM {table} ORDER BY {order}")
        while batch := await anyio.to_thread.run_sync(cursor.fetchmany, BATCH_ROWS):
            yield [_row(wanted, values) for values in batch]
    except sqlite3.Error as exc:
        raise StoreError(f"{source}: cannot read {table}: {exc}") from exc


def _column(name: str, present: set[str]) -> str:
    """``name`` as the source has it: itself, its older name, or NULL when it had none."""
    if name in present:
        return name
    old = OLD_COLUMN_NAMES.get(name)
    return f"{old} AS {name}" if old is not None and old in present else f"NULL AS {name}"


def _row(names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    row = dict(zip(names, values, strict=True))
    for name in NAME_COLUMNS:
        if isinstance(row.get(name), str):
            row[name] = raw(row[name])
    return row


async def _insert(conn: Connection, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        async with conn.cursor() as cursor:
            await cursor.executemany(QUERIES[name], [_clean(row) for row in rows])
