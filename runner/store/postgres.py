"""The PostgreSQL store: psycopg 3 (async) over a small connection pool.

Every statement lives in ``postgres_queries.sql``; this class only runs them, with the same
meaning as the SQLite store (the store contract suite runs on both). File names are BYTEA.
The schema is versioned in ``meta`` and migrated at start inside one transaction holding an
advisory lock, so runners starting together migrate once.

Until the stages claim their work row by row, a writing store owns its database as the SQLite
store owns its file: a session advisory lock, held on a connection of its own for as long as the
store is open and dropped by the server when that connection dies, refuses a second runner.

A password never appears in a message: the URL is shown without it (:func:`shown_url`) and
every database error is scrubbed of it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from runner import faults
from runner.errors import ClaimLostError, StateInUseError, StoreError
from runner.names import from_raw, raw
from runner.store.base import (
    BatchLimits,
    Counts,
    Delivery,
    FileRow,
    Finished,
    GroupRow,
    KnownFile,
    NewFile,
    NextPoll,
    RunnerRow,
)
from runner.store.named_sql import load_queries, statements
from runner.store.sqlite import new_call_reference_id

SCHEMA_VERSION = 2
QUERIES = load_queries("postgres_queries.sql")
MIGRATIONS: dict[int, str] = {1: QUERIES["schema_1"], 2: QUERIES["schema_2"]}
FENCED = frozenset(
    {
        "mark_sending",
        "mark_submitted",
        "mark_submit_later",
        "mark_unknown",
        "mark_terminal",
        "reschedule_poll",
        "drop_empty_group",
        "shrink_group",
        "mark_delivered",
    }
)
"""Writes that must change every row they name: one that does not was fenced off (or is gone)."""
DEFAULT_LEASE_SECONDS = 30.0
PASSWORD_CREDENTIAL = "store-password"
"""The file under ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) with the password."""

MIGRATION_LOCK = 0x62656D01
OWNER_LOCK = 0x62656D02
"""The first key of each advisory lock ("bem" and a number); the second names the schema."""

POOL_SIZE = 4
CONNECT_TIMEOUT_SECONDS = 10
_NAME_COLUMNS = ("rel", "group_key")
Row = TypeVar("Row", GroupRow, FileRow)
Connection = psycopg.AsyncConnection[Any]


# -- where to connect, and how to say it --------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A parsed store URL: what to connect with, and how to name it in messages."""

    conninfo: str
    shown: str
    password: str | None
    """Given here only when libpq would not find it itself (the credentials directory)."""
    secrets: tuple[str, ...]
    """Every password that may reach an error message, to scrub."""

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str]) -> Target:
        secrets = [s for s in (environ.get("PGPASSWORD"),) if s]
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"the store URL is not a valid PostgreSQL URL: {exc}") from None
        in_url = params.get("password")
        if in_url:
            secrets.append(str(in_url))
        password = None
        if not in_url and not environ.get("PGPASSWORD"):
            password = _credential_password(environ)
            if password:
                secrets.append(password)
        return cls(url, shown_url(params), password, tuple(secrets))

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def shown_url(params: Mapping[str, Any]) -> str:
    """The URL as messages show it: user, host, port and database, never a password."""
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or "")
    if "/" in host:  # a socket directory
        host = f"[{host}]"
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _credential_password(environ: Mapping[str, str]) -> str | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / PASSWORD_CREDENTIAL
    try:
        return path.read_text(encoding="utf-8").strip("\r\n") or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read the store password from {path}: {exc}") from None


def _connect_kwargs(target: Target) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "application_name": f"bem-runner {socket.gethostname()} pid {os.getpid()}"[:63],
    }
    if target.password is not None:
        kwargs["password"] = target.password
    return kwargs


# -- opening ------------------------------------------------------------------------------------


@asynccontextmanager
async def open_postgres_store(
    url: str,
    *,
    read_only: bool = False,
    runner_id: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[PostgresStore]:
    """Open the store at ``url``, migrating it first unless ``read_only``.

    A writer without a ``runner_id`` owns the store while it is open, and a second one is refused
    with :class:`StateInUseError`. With one, it shares the store: it joins the runners (its
    claims last ``lease_seconds`` unless renewed by :meth:`PostgresStore.heartbeat`) and leaves
    when closed.
    """
    target = Target.from_url(url, os.environ if environ is None else environ)
    kwargs = _connect_kwargs(target)
    owner = await _connect(target, kwargs)
    try:
        if read_only:
            await _check_readable(owner, target)
        else:
            await _migrate(owner, target)
            if runner_id is None:
                await _own(owner, target)
        pool = AsyncConnectionPool(
            target.conninfo,
            kwargs=kwargs,
            min_size=1,
            max_size=POOL_SIZE,
            open=False,
            name="bem-runner-store",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            raise StoreError(f"{target.shown}: cannot connect: {target.scrub(str(exc))}") from None
        store = PostgresStore(pool, target, runner_id=runner_id, lease_seconds=lease_seconds)
        try:
            if runner_id is not None and not read_only:
                await store.join()
            yield store
            if runner_id is not None and not read_only:
                with anyio.CancelScope(shield=True):
                    await store.leave()
        finally:
            with anyio.CancelScope(shield=True):
                await pool.close()
    finally:
        with anyio.CancelScope(shield=True):
            await owner.close()


async def _connect(target: Target, kwargs: Mapping[str, Any]) -> Connection:
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


async def _migrate(conn: Connection, target: Target) -> None:
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


async def _check_readable(conn: Connection, target: Target) -> None:
    try:
        version = await _schema_version(conn, target)
    except psycopg.Error as exc:
        raise StoreError(f"{target.shown}: {target.scrub(str(exc))}") from None
    if version == 0:
        raise StoreError(f"{target.shown}: no bem-runner store here (check the store URL)")


async def _own(conn: Connection, target: Target) -> None:
    try:
        if await _scalar(conn, "owner_lock", {"purpose": OWNER_LOCK}):
            return
        cursor = await conn.execute(QUERIES["owner_lock_holder"], {"purpose": OWNER_LOCK})
        holder = await cursor.fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"{target.shown}: {target.scrub(str(exc))}") from None
    who = f"{holder[0] or 'a client'} from {holder[1] or 'a local socket'}" if holder else "unknown"
    raise StateInUseError(f"store {target.shown} is in use by {who}")


# -- the store ----------------------------------------------------------------------------------


@dataclass
class _OpenGroup:
    id: int
    file_count: int
    byte_count: int


def window_is_full(group: _OpenGroup, size: int, limits: tuple[int, int]) -> bool:
    """Whether a file of ``size`` bytes would overflow the group (a lone file always fits)."""
    max_files, max_bytes = limits
    if group.file_count >= max_files:
        return True
    return group.file_count > 0 and group.byte_count + size > max_bytes


class PostgresStore:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        target: Target,
        *,
        runner_id: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self._pool = pool
        self._target = target
        self._me = runner_id
        self._lease = lease_seconds
        self._opened_at = time.time()

    # -- plumbing ---------------------------------------------------------------------------

    def _error(self, label: str, exc: psycopg.Error) -> StoreError:
        return StoreError(f"{self._target.shown}: {label}: {self._target.scrub(str(exc))}")

    async def _fetch(
        self, name: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        try:
            async with (
                self._pool.connection() as conn,
                conn.cursor(row_factory=dict_row) as cursor,
            ):
                await cursor.execute(QUERIES[name], params or {})
                return await cursor.fetchall()
        except psycopg.Error as exc:
            raise self._error(name, exc) from None

    async def _scalar(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        rows = await self._fetch(name, params)
        return next(iter(rows[0].values())) if rows else None

    @asynccontextmanager
    async def _transaction(self, label: str) -> AsyncIterator[Connection]:
        """One write transaction; ``label`` names it for the crash points."""
        # Once begun, a transaction runs to its commit or rollback, as in the SQLite store.
        with anyio.CancelScope(shield=True):
            try:
                async with self._pool.connection() as conn:
                    async with conn.transaction():
                        yield conn
                        faults.point("store.before_commit", label)
                    faults.point("store.after_commit", label)
            except psycopg.Error as exc:
                raise self._error(label, exc) from None

    async def _write(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        async with self._transaction(name) as conn, conn.cursor() as cursor:
            await self._many(cursor, name, rows)

    async def _many(
        self, cursor: psycopg.AsyncCursor[Any], name: str, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Run ``name`` once per row, as this runner; a fenced write refuses the transaction."""
        params = [_clean({**row, "me": self._me}) for row in rows]
        await cursor.executemany(QUERIES[name], params)
        if name in FENCED and cursor.rowcount < len(params):
            raise ClaimLostError(
                f"{self._target.shown}: {name}: {len(params) - cursor.rowcount} of "
                f"{len(params)} groups are held by another runner (or gone); nothing written"
            )

    async def _rows(self, cls: type[Row], name: str, params: Mapping[str, Any]) -> list[Row]:
        names = [f.name for f in fields(cls)]
        rows = await self._fetch(name, params)
        return [cls(**{key: _column(key, row[key]) for key in names}) for row in rows]

    async def integrity_check(self) -> str:
        mismatched = int(await self._scalar("integrity_check") or 0)
        if mismatched:
            return f"{mismatched} calls whose file count does not match their files"
        return "ok"

    async def close(self) -> None:
        await self._pool.close()

    # -- intake -----------------------------------------------------------------------------

    async def recover(self) -> None:
        """A POST that was in flight when the last process died has an unknown outcome."""
        async with self._transaction("recover_sending") as conn:
            await conn.execute(QUERIES["recover_sending"], {"me": self._me})

    async def known_files(self) -> dict[str, KnownFile]:
        rows = await self._fetch("known_files")
        return {
            from_raw(row["rel"]): KnownFile(row["size"], row["mtime_ns"], row["state"])
            for row in rows
        }

    async def add_files(
        self, files: list[NewFile], *, now: float, batch_limits: BatchLimits
    ) -> None:
        if not files:
            return
        async with self._transaction("add_files") as conn:
            group_ids = await self._groups_for(conn, files, now, batch_limits)
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    QUERIES["insert_file"],
                    [
                        _file_params(new, gid, now)
                        for new, gid in zip(files, group_ids, strict=True)
                    ],
                )

    async def _groups_for(
        self, conn: Connection, files: list[NewFile], now: float, batch_limits: BatchLimits
    ) -> list[int | None]:
        """The group of each file (None for a rejected one), creating and closing groups."""
        group_ids: list[int | None] = [None] * len(files)
        alone: list[int] = []
        batched: dict[str, list[int]] = {}
        for index, new in enumerate(files):
            if new.destination is None or new.reason is not None:
                continue
            if new.destination.mode == "file":
                alone.append(index)
            else:
                batched.setdefault(new.destination.group_key, []).append(index)
        born = await self._born_ready(conn, files, alone, now)
        for index, group_id in zip(alone, born, strict=True):
            group_ids[index] = group_id
        for key, indexes in batched.items():
            members = [files[i] for i in indexes]
            filled = await self._fill_open(conn, key, members, now, batch_limits.get(key))
            for index, group_id in zip(indexes, filled, strict=True):
                group_ids[index] = group_id
        return group_ids

    async def _born_ready(
        self, conn: Connection, files: list[NewFile], indexes: list[int], now: float
    ) -> list[int]:
        """A ready group of its own for each file-mode file, in one pipelined statement."""
        if not indexes:
            return []
        params = []
        for index in indexes:
            new = files[index]
            assert new.destination is not None
            params.append(_group_params(new.destination.workflow, "file", new.rel, "ready", now))
            params[-1].update(file_count=1, byte_count=new.size)
        ids: list[int] = []
        async with conn.cursor() as cursor:
            await cursor.executemany(QUERIES["insert_group"], params, returning=True)
            while True:
                row = await cursor.fetchone()
                assert row is not None
                ids.append(int(row[0]))
                if not cursor.nextset():
                    break
        return ids

    async def _fill_open(
        self,
        conn: Connection,
        key: str,
        files: list[NewFile],
        now: float,
        limits: tuple[int, int] | None,
    ) -> list[int]:
        """Add files to the open group of ``key``; a full window is closed and another opened."""
        cursor = await conn.execute(QUERIES["open_group_by_key"], {"group_key": raw(key)})
        row = await cursor.fetchone()
        current = _OpenGroup(*row) if row is not None else None
        touched: dict[int, _OpenGroup] = {}
        ids: list[int] = []
        for new in files:
            assert new.destination is not None
            if (
                current is not None
                and limits is not None
                and window_is_full(current, new.size, limits)
            ):
                await conn.execute(QUERIES["close_group"], {"id": current.id})
                current = None
            if current is None:
                params = _group_params(
                    new.destination.workflow, new.destination.mode, key, "open", now
                )
                params.update(file_count=0, byte_count=0)
                cursor = await conn.execute(QUERIES["insert_group"], params)
                inserted = await cursor.fetchone()
                assert inserted is not None
                current = _OpenGroup(int(inserted[0]), 0, 0)
            current.file_count += 1
            current.byte_count += new.size
            touched[current.id] = current
            ids.append(current.id)
        async with conn.cursor() as update:
            await update.executemany(
                QUERIES["set_group_size"],
                [
                    {"id": g.id, "file_count": g.file_count, "byte_count": g.byte_count, "now": now}
                    for g in touched.values()
                ],
            )
        return ids

    async def open_groups(self) -> list[GroupRow]:
        return await self._rows(GroupRow, "open_groups", {})

    async def close_group(self, group_id: int) -> None:
        await self._write("close_group", [{"id": group_id}])

    # -- submit -----------------------------------------------------------------------------

    async def ready_groups(self, *, now: float, limit: int) -> list[GroupRow]:
        return await self._rows(GroupRow, "ready_groups", {"now": now, "limit": limit})

    async def group(self, group_id: int) -> GroupRow:
        rows = await self._rows(GroupRow, "group_by_id", {"id": group_id})
        if not rows:
            raise StoreError(f"{self._target.shown}: no group {group_id}")
        return rows[0]

    async def files_of_groups(self, group_ids: Sequence[int]) -> dict[int, list[FileRow]]:
        """The files of many groups with one query, by group."""
        by_group: dict[int, list[FileRow]] = {gid: [] for gid in group_ids}
        if not group_ids:
            return by_group
        rows = await self._rows(FileRow, "files_of_groups", {"group_ids": list(group_ids)})
        for row in rows:
            assert row.group_id is not None
            by_group[row.group_id].append(row)
        return by_group

    async def supersede_file(self, file: FileRow) -> None:
        """The file changed after it was queued: drop it from its group; it will be taken anew."""
        async with self._transaction("supersede_file") as conn, conn.cursor() as cursor:
            if file.group_id is not None:
                await self._many(cursor, "shrink_group", [{"id": file.group_id, "size": file.size}])
            await cursor.execute(QUERIES["supersede_file"], {"id": file.id})

    async def reject_queued_file(self, file: FileRow, reason: str) -> None:
        async with self._transaction("reject_file") as conn, conn.cursor() as cursor:
            if file.group_id is not None:
                await self._many(cursor, "shrink_group", [{"id": file.group_id, "size": file.size}])
            await cursor.execute(QUERIES["reject_file"], _clean({"id": file.id, "reason": reason}))

    async def drop_empty_group(self, group_id: int) -> None:
        await self._write("drop_empty_group", [{"id": group_id}])

    async def mark_sending(self, group_ids: list[int], *, now: float) -> None:
        await self._write("mark_sending", ({"id": gid, "now": now} for gid in group_ids))

    async def mark_submitted(
        self, group_id: int, *, call_id: str, status: str | None, now: float, next_poll: float
    ) -> None:
        await self._write(
            "mark_submitted",
            [
                {
                    "id": group_id,
                    "call_id": call_id,
                    "status": status,
                    "now": now,
                    "next_poll": next_poll,
                }
            ],
        )

    async def mark_submit_later(self, group_ids: list[int], *, not_before: float) -> None:
        await self._write(
            "mark_submit_later", ({"id": gid, "not_before": not_before} for gid in group_ids)
        )

    async def mark_unknown(self, group_ids: list[int], *, not_before: float) -> None:
        await self._write(
            "mark_unknown", ({"id": gid, "not_before": not_before} for gid in group_ids)
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
        async with self._transaction("mark_terminal") as conn, conn.cursor() as cursor:
            await self._many(
                cursor,
                "mark_terminal",
                [
                    {
                        "id": f.group_id,
                        "status": f.status,
                        "result_json": f.result_json,
                        "error_reason": f.error_reason,
                        "now": now,
                    }
                    for f in finished
                ],
            )
            if next_polls:
                await self._many(cursor, "reschedule_poll", _next_poll_rows(next_polls))

    # -- poll -------------------------------------------------------------------------------

    async def due_polls(self, *, now: float, limit: int) -> list[GroupRow]:
        return await self._rows(GroupRow, "due_polls", {"now": now, "limit": limit})

    async def reschedule_polls(self, next_polls: Sequence[NextPoll]) -> None:
        await self._write("reschedule_poll", _next_poll_rows(next_polls))

    async def due_unknown(self, *, now: float, limit: int) -> list[GroupRow]:
        return await self._rows(GroupRow, "due_unknown", {"now": now, "limit": limit})

    async def next_poll_due(self) -> float | None:
        value = await self._scalar("next_poll_due")
        return float(value) if value is not None else None

    async def next_submit_due(self) -> float | None:
        """When the next ready or unknown group is due (an unknown one is listed, not sent)."""
        value = await self._scalar("next_submit_due")
        return float(value) if value is not None else None

    # -- deliver ----------------------------------------------------------------------------

    async def terminal_groups(self, *, limit: int) -> list[GroupRow]:
        return await self._rows(GroupRow, "terminal_groups", {"limit": limit})

    async def rejected_files(self, *, limit: int) -> list[FileRow]:
        return await self._rows(FileRow, "rejected_files", {"limit": limit})

    async def delivered_files(self, *, limit: int) -> list[FileRow]:
        return await self._rows(FileRow, "delivered_files", {"limit": limit})

    async def mark_delivered(
        self, deliveries: Sequence[Delivery], *, finished_groups: Sequence[int], now: float
    ) -> None:
        """Files whose documents are written; groups with no file left to deliver are done."""
        if not deliveries and not finished_groups:
            return
        async with self._transaction("mark_delivered") as conn, conn.cursor() as cursor:
            if deliveries:
                await self._many(
                    cursor,
                    "mark_delivered",
                    [
                        {"id": d.file_id, "outcome": d.outcome, "reason": d.reason, "now": now}
                        for d in deliveries
                    ],
                )
            if finished_groups:
                await self._many(cursor, "mark_group_done", [{"id": g} for g in finished_groups])

    async def mark_done(self, file_ids: Sequence[int], *, now: float) -> None:
        await self._write("mark_done", ({"id": fid, "now": now} for fid in file_ids))

    # -- reports ----------------------------------------------------------------------------

    async def counts(self) -> Counts:
        files: dict[str, int] = {}
        for row in await self._fetch("count_files"):
            state, outcome, count = row["state"], row["outcome"], int(row["count"])
            key = f"{state}:{outcome}" if state in ("delivered", "done") and outcome else state
            files[key] = files.get(key, 0) + count
        groups = {row["state"]: int(row["count"]) for row in await self._fetch("count_groups")}
        return Counts(files=files, groups=groups, open_calls=await self.open_call_count())

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

    # -- several runners --------------------------------------------------------------------
    # Without a runner id this store owns its database, so a claim is the list it replaces.

    async def claim_ready(self, *, now: float, limit: int) -> list[GroupRow]:
        if self._me is None:
            return await self.ready_groups(now=now, limit=limit)
        rows = await self._claim("claim_ready", {"now": now, "limit": limit})
        return sorted(rows, key=lambda g: (g.not_before, g.id))

    async def claim_due_unknown(self, *, now: float, limit: int) -> list[GroupRow]:
        if self._me is None:
            return await self.due_unknown(now=now, limit=limit)
        rows = await self._claim("claim_due_unknown", {"now": now, "limit": limit})
        return sorted(rows, key=lambda g: g.id)

    async def claim_due_polls(self, *, now: float, limit: int) -> list[GroupRow]:
        if self._me is None:
            return await self.due_polls(now=now, limit=limit)
        rows = await self._claim("claim_due_polls", {"now": now, "limit": limit})
        return sorted(rows, key=lambda g: (g.not_before, g.id))

    async def claim_terminal(self, *, limit: int) -> list[GroupRow]:
        if self._me is None:
            return await self.terminal_groups(limit=limit)
        rows = await self._claim("claim_terminal", {"limit": limit})
        return sorted(rows, key=lambda g: (g.finished_at or 0.0, g.id))

    async def _claim(self, name: str, params: Mapping[str, Any]) -> list[GroupRow]:
        names = [f.name for f in fields(GroupRow)]
        async with self._transaction(name) as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(QUERIES[name], {**params, "me": self._me, "lease": self._lease})
            rows = await cursor.fetchall()
        return [GroupRow(**{key: _column(key, row[key]) for key in names}) for row in rows]

    async def release(self, group_ids: Sequence[int]) -> None:
        if self._me is None or not group_ids:
            return
        async with self._transaction("release") as conn:
            await conn.execute(QUERIES["release"], {"ids": list(group_ids), "me": self._me})

    async def join(self) -> None:
        params = {"me": self._me, "host": socket.gethostname(), "pid": os.getpid()}
        async with self._transaction("join_runner") as conn:
            await conn.execute(QUERIES["join_runner"], {**params, "lease": self._lease})

    async def leave(self) -> None:
        """Gone for good: claims free, a POST still marked in flight unknown."""
        async with self._transaction("leave_runner") as conn:
            await conn.execute(QUERIES["leave_runner"], {"me": self._me})

    async def heartbeat(self) -> None:
        if self._me is None:
            return
        params = {"me": self._me, "lease": self._lease}
        async with self._transaction("heartbeat") as conn:
            cursor = await conn.execute(QUERIES["heartbeat"], params)
            if await cursor.fetchone() is None:
                raise ClaimLostError(
                    f"{self._target.shown}: runner {self._me} was declared dead by another "
                    "runner (silent past its lease); its claims were taken"
                )
            await conn.execute(QUERIES["renew_claims"], params)

    async def expire_runners(self) -> list[str]:
        async with self._transaction("expire_runners") as conn:
            cursor = await conn.execute(QUERIES["expire_runners"])
            return [str(row[0]) for row in await cursor.fetchall()]

    async def runners(self) -> list[RunnerRow]:
        if self._me is None:
            host, pid = socket.gethostname(), os.getpid()
            calls = await self.open_call_count()
            return [RunnerRow(f"{host}-{pid}", host, pid, self._opened_at, time.time(), calls)]
        return [
            RunnerRow(
                str(r["id"]),
                str(r["host"]),
                int(r["pid"]),
                float(r["started_at"]),
                float(r["heartbeat_at"]),
                int(r["calls_held"]),
            )
            for r in await self._fetch("runners")
        ]


def _column(key: str, value: Any) -> Any:
    return from_raw(value) if key in _NAME_COLUMNS and isinstance(value, bytes) else value


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    """PostgreSQL text cannot hold NUL: one in a message from bem is kept as U+FFFD."""
    return {
        key: value.replace("\0", "\ufffd") if isinstance(value, str) else value
        for key, value in params.items()
    }


def _group_params(workflow: str, mode: str, key: str, state: str, now: float) -> dict[str, Any]:
    return {
        "call_reference_id": new_call_reference_id(),
        "workflow": workflow,
        "mode": mode,
        "group_key": raw(key),
        "state": state,
        "now": now,
    }


def _file_params(new: NewFile, group_id: int | None, now: float) -> dict[str, Any]:
    destination = new.destination
    return _clean(
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
        }
    )


def _next_poll_rows(next_polls: Sequence[NextPoll]) -> list[dict[str, Any]]:
    return [{"id": n.group_id, "not_before": n.not_before, "status": n.status} for n in next_polls]
