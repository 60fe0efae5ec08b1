"""Running the named statements of ``postgres_queries.sql``: reads, transactions, fencing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from runner import faults
from runner.errors import ClaimLostError, StoreError, StoreUnavailableError
from runner.store.base import DEFAULT_LEASE_SECONDS, CallRow, FileRow, rows_as
from runner.store.named_sql import load_queries
from runner.store.postgres_target import Target

QUERIES = load_queries("postgres_queries.sql")
FENCED = frozenset(
    {
        "mark_sending",
        "mark_submitted",
        "mark_submit_later",
        "mark_unknown",
        "mark_terminal",
        "reschedule_poll",
        "drop_empty_call",
        "shrink_call",
        "mark_delivered",
    }
)
"""Writes that must change every row they name: one that does not was fenced off (or is gone)."""
ALL_STAGES = ("submit", "poll", "deliver")
WAKES: dict[str, tuple[str, ...]] = {
    "add_files": ("submit", "deliver"),
    "close_batch": ("submit",),
    "recover_sending": ("submit",),
    "mark_submit_later": ("submit",),
    "mark_unknown": ("submit",),
    "mark_submitted": ("poll",),
    "mark_terminal": ("deliver", "submit"),
    "reject_file": ("deliver",),
    "settle_duplicates": ("deliver",),
    "release": ALL_STAGES,
    "leave_runner": ALL_STAGES,
}
"""The stages of other runners that a write (by its label) gives work to; told on commit."""
_PASSING = (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout)
"""Errors that may pass: a lost or refused connection (a restart, the network, a full pool), or
a session the server ended after this runner sat frozen inside a transaction past its lease."""
Row = TypeVar("Row", CallRow, FileRow)
Connection = psycopg.AsyncConnection[Any]


class PostgresPlumbing:
    """The pool, this runner's id, and how a statement is run and its error told."""

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
        self.owned = False
        """This process owns the store alone (no runner id, not read-only)."""

    def _error(self, label: str, exc: psycopg.Error) -> StoreError:
        kind = StoreUnavailableError if isinstance(exc, _PASSING) else StoreError
        return kind(f"{self._target.shown}: {label}: {self._target.scrub(str(exc))}")

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

    async def _statement(self, name: str, params: Mapping[str, Any]) -> int:
        """One write statement on its own, as this runner (atomic without a transaction around
        it, so one round-trip); the rows it changed."""
        try:
            async with self._pool.connection() as conn, conn.cursor() as cursor:
                await cursor.execute(QUERIES[name], _clean({**params, "me": self._me}))
                return cursor.rowcount
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
                        if self._me is not None and label in WAKES:
                            await self._wake(conn, WAKES[label])
                        faults.point("store.before_commit", label)
                    faults.point("store.after_commit", label)
            except psycopg.Error as exc:
                raise self._error(label, exc) from None

    async def _wake(self, conn: Connection, stages: Sequence[str]) -> None:
        """Tell the other runners' ``stages`` to look again, when this transaction commits."""
        await conn.execute(QUERIES["wake"], {"stages": list(stages), "me": self._me})

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
                f"{len(params)} calls are held by another runner (or gone); nothing written"
            )

    async def _rows(self, cls: type[Row], name: str, params: Mapping[str, Any]) -> list[Row]:
        return rows_as(cls, await self._fetch(name, params))


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    """PostgreSQL text cannot hold NUL: one in a message from bem is kept as U+FFFD."""
    return {
        key: value.replace("\0", "\ufffd") if isinstance(value, str) else value
        for key, value in params.items()
    }
