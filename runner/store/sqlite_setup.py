"""Opening the SQLite state: the connections, the pragmas (WAL, ``synchronous=FULL``), the
schema's migration for a writer, and the checks of a read-only open."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path

import aiosqlite
import anyio

from runner.errors import StoreError
from runner.store.sqlite_plumbing import QUERIES, SqlitePlumbing

SCHEMA_VERSION = 6
MIGRATIONS: dict[int, str] = {
    version: QUERIES[f"schema_{version}"] for version in range(1, SCHEMA_VERSION + 1)
}
READER_BUSY_TIMEOUT = 0.002
"""Seconds the event loop's reader waits for a lock before its read takes the trip instead."""


async def connect(path: Path, *, read_only: bool) -> aiosqlite.Connection:
    if read_only and not path.is_file():  # noqa: ASYNC240 (one stat, at startup)
        raise StoreError(f"{path}: no state database here (check --state / paths.state)")
    target, uri = (_read_only_uri(path), True) if read_only else (str(path), False)
    try:
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        # shielded: a connection cancelled half-way would leave its thread running
        with anyio.CancelScope(shield=True):
            connection = await aiosqlite.connect(target, isolation_level=None, uri=uri)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{path}: cannot open state database: {exc}") from exc
    return connection


def _read_only_uri(path: Path) -> str:
    return f"file:{urllib.parse.quote(os.fsencode(path))}?mode=ro"


class SqliteSetup(SqlitePlumbing):
    async def migrate(self) -> None:
        self._db.row_factory = sqlite3.Row
        try:
            with self._in_use():
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
        self._check_version(version)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            async with self._transaction(f"schema_{target}") as db:
                for statement in MIGRATIONS[target].split(";\n"):
                    if statement.strip():
                        await db.execute(statement)
        self._open_reader()

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
        self._check_version(version)
        self._open_reader()

    def _open_reader(self) -> None:
        """The event loop's read-only connection to the same file, for small reads.

        Opened here, on the loop's thread (it is used nowhere else), once the schema is ready.
        """
        try:
            reader = sqlite3.connect(
                _read_only_uri(self._path),
                uri=True,
                timeout=READER_BUSY_TIMEOUT,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self._path}: cannot open state database: {exc}") from exc
        reader.row_factory = sqlite3.Row
        self._reader = reader

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self._path}: schema version {version} is newer than this bem-runner "
                f"({SCHEMA_VERSION}); upgrade bem-runner"
            )

    async def integrity_check(self) -> str:
        return str(await self._scalar_raw("PRAGMA integrity_check"))

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()  # first: the last connection to close checkpoints the WAL
        await self._db.close()
