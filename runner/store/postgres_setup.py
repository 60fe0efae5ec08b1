"""Opening a PostgreSQL store: the schema checked and migrated, and the store owned.

Migration runs in one transaction holding an advisory lock, so runners starting together
migrate once. A store without runner ids is owned like SQLite's file: a session advisory lock
on a connection of its own, dropped by the server when that connection dies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import anyio
import psycopg

from runner.errors import StateInUseError, StoreError
from runner.store.named_sql import statements
from runner.store.postgres_plumbing import QUERIES, Connection
from runner.store.postgres_target import Target

SCHEMA_VERSION = 7
MIGRATIONS: dict[int, str] = {n: QUERIES[f"schema_{n}"] for n in range(1, SCHEMA_VERSION + 1)}
MIGRATION_LOCK = 0x62656D01
OWNER_LOCK = 0x62656D02
"""The first key of each advisory lock ("bem" and a number); the second names the schema."""


async def connect(target: Target, kwargs: Mapping[str, Any]) -> Connection:
    try:
        # shielded: a connection cancelled half-way would be left to the garbage collector
        with anyio.CancelScope(shield=True):
            conn = await psycopg.AsyncConnection.connect(target.conninfo, **kwargs)
    except psycopg.Error as exc:
        raise StoreError(f"{target.shown}: cannot connect: {target.scrub(str(exc))}") from None
    return conn


async def _scalar(conn: Connection, name: str, params: Mapping[str, Any] | None = None) -> Any:
    cursor = await conn.execute(QUERIES[name], params or {})
    row = await cursor.fetchone()
    return row[0] if row else None


async def _schema_version(conn: Connection, target: Target) -> int:
    """The schema version of the database; 0 when it has no bem-runner tables yet."""
    cursor = await conn.execute(QUERIES["tables"])
    tables = {row[0] for row in await cursor.fetchall()}
    if "meta" not in tables:
        if tables:
            raise StoreError(
                f"{target.shown}: not a bem-runner store (tables {sorted(tables)} exist without "
                "its meta table); give bem-runner a database of its own"
            )
        return 0
    if await _scalar(conn, "application") != "bem-runner":
        raise StoreError(f"{target.shown}: not a bem-runner store (its meta table is not ours)")
    version = int(await _scalar(conn, "schema_version") or 0)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{target.shown}: schema version {version} is newer than this bem-runner "
            f"({SCHEMA_VERSION}); upgrade bem-runner"
        )
    return version


async def migrate(conn: Connection, target: Target) -> None:
    try:
        async with conn.transaction():
            # held to the commit: a runner starting meanwhile waits, then finds nothing to do
            await conn.execute(QUERIES["migration_lock"], {"purpose": MIGRATION_LOCK})
            version = await _schema_version(conn, target)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in statements(MIGRATIONS[step]):
                    await conn.execute(statement)
                if step > 1:
                    await conn.execute(
                        "UPDATE meta SET value = %(v)s WHERE key = 'schema_version'",
                        {"v": str(step)},
                    )
    except psycopg.Error as exc:
        raise StoreError(f"{target.shown}: cannot migrate: {target.scrub(str(exc))}") from None


async def check_readable(conn: Connection, target: Target) -> None:
    try:
        version = await _schema_version(conn, target)
    except psycopg.Error as exc:
        raise StoreError(f"{target.shown}: {target.scrub(str(exc))}") from None
    if version == 0:
        raise StoreError(f"{target.shown}: no bem-runner store here (check the store URL)")


async def own(conn: Connection, target: Target) -> None:
    try:
        if await _scalar(conn, "owner_lock", {"purpose": OWNER_LOCK}):
            return
        cursor = await conn.execute(QUERIES["owner_lock_holder"], {"purpose": OWNER_LOCK})
        holder = await cursor.fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"{target.shown}: {target.scrub(str(exc))}") from None
    who = f"{holder[0] or 'a client'} from {holder[1] or 'a local socket'}" if holder else "unknown"
    raise StateInUseError(f"store {target.shown} is in use by {who}")


async def disown(conn: Connection) -> None:
    """Give the store up before its connection closes. The server drops a closed connection's
    locks only once its backend has exited, which can come after the next owner's try; a
    connection already broken has no backend left to hold the lock."""
    with contextlib.suppress(psycopg.Error):
        await conn.execute(QUERIES["owner_unlock"], {"purpose": OWNER_LOCK})
