"""Running the named statements of ``queries.sql`` on the SQLite store's connections.

Reads, one write transaction at a time (``BEGIN IMMEDIATE``, with the crash points around its
commit), and rows turned back into :class:`CallRow` / :class:`FileRow` with names as text.

The connection lives on aiosqlite's thread, and each trip there and back costs the event loop
about 100 µs of CPU (the queue hand-off, the thread's wake-up, the GIL changing hands, the
loop's self-pipe wake-up), far more than a small SELECT itself. The writes of the pipeline's
stages are one trip each, their whole transaction written as a plain function of the connection
(:meth:`SqlitePlumbing._run_transaction`). Rarer writes that decide between statements use the
async :meth:`SqlitePlumbing._transaction`, a trip per statement.

The stages' small reads (:meth:`SqlitePlumbing._read`) make no trip when none is needed: when
nothing is queued or running on aiosqlite's connection and no transaction is open, they run at
once on the event loop's thread, through a second, read-only connection to the same file (WAL
lets it read beside the writer). Every write committed so far is then visible to it, so its
answer is the one the trip would have brought. Otherwise the read takes the trip, in order as
ever: behind a queued write it sees that write, inside an open transaction its uncommitted
rows. Reads that grow with the whole store (start-up's list of files, the counts, the reports)
always take the trip: the event loop never waits for them.
"""

from __future__ import annotations

import sqlite3
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio
import anyio.lowlevel
import msgspec

from runner import faults
from runner.errors import StoreError
from runner.store.base import CallRow, FileRow, rows_as
from runner.store.named_sql import load_queries

QUERIES = load_queries("queries.sql")
Row = TypeVar("Row", CallRow, FileRow)
Result = TypeVar("Result")
_LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
"""Primary result codes of a lock held elsewhere (the extended codes are these in the low byte)."""
Work = Callable[[sqlite3.Connection], None]
"""A transaction's statements, run on the connection's own thread. It returns nothing: a
cursor that reached the event loop's thread and was freed there would reset its statement
while the connection's thread runs that same cached statement for someone else."""


class _Batch(msgspec.Struct):
    rows: list[Mapping[str, Any]]
    committed: anyio.Event = msgspec.field(default_factory=anyio.Event)
    error: BaseException | None = None


class SqlitePlumbing:
    """The connection, the state's path (for messages), and how a statement is run."""

    def __init__(self, connection: aiosqlite.Connection, path: Path, *, owned: bool = True) -> None:
        self._db = connection
        self._path = path
        self.owned = owned
        """This process owns the state (a writer); False when it only reads it."""
        self._writer = anyio.Lock()  # one connection, so one transaction at a time
        self._batches: dict[str, _Batch] = {}
        """Rows of one statement waiting for the writer together (:meth:`_write_together`)."""
        self._reader: sqlite3.Connection | None = None
        """The event loop's own read-only connection (:meth:`_read`), once the schema is ready."""
        self._uses = 0
        """Uses of aiosqlite's connection under way (:meth:`_in_use`)."""

    async def _read(self, name: str, params: Mapping[str, Any] | None = None) -> list[sqlite3.Row]:
        """A small read: on the event loop's thread when aiosqlite's connection is idle.

        Only for reads whose rows are few and quick to find whatever the size of the store
        (bounded by a ``LIMIT``, by a batch of ids, or by the work in flight): the loop waits
        for them. Any other read is :meth:`_fetch`.
        """
        rows = self._read_here(name, params or {})
        if rows is None:
            return await self._fetch(name, params)
        await anyio.lowlevel.checkpoint()  # a store call still lets other tasks run, or cancels
        return rows

    def _read_here(self, name: str, params: Mapping[str, Any]) -> list[sqlite3.Row] | None:
        """The rows, read on this thread; None when the read must take the trip instead.

        It must while aiosqlite's connection is in use, a call queued or running or a
        transaction open (the read would miss what they write), before the schema is ready, and
        when the file is locked: the loop does not wait for a lock (its busy timeout is short),
        aiosqlite's thread does.
        """
        if self._reader is None or self._uses:
            return None
        try:
            return _fetch_all(self._reader, QUERIES[name], params)
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _LOCKED:
                return None
            raise StoreError(f"{self._path}: {name}: {exc}") from exc

    async def _fetch(self, name: str, params: Mapping[str, Any] | None = None) -> list[sqlite3.Row]:
        """A read on aiosqlite's thread, in order with everything sent there before it."""
        try:
            with self._in_use():
                return list(await self._db.execute_fetchall(QUERIES[name], params or {}))
        except sqlite3.Error as exc:
            raise StoreError(f"{self._path}: {name}: {exc}") from exc

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """Around every use of aiosqlite's connection, a call or a whole transaction: meanwhile
        :meth:`_read` queues behind it.

        A call cancelled while it waits is still run by that thread, yet counts no longer: that
        is harmless, as only reads can be cancelled (writes are shielded).
        """
        self._uses += 1
        try:
            yield
        finally:
            self._uses -= 1

    async def _fetch_each(self, names: Sequence[str]) -> list[list[sqlite3.Row]]:
        """The rows of each named read, all of them in one trip to the connection's thread."""
        try:
            return await self._on_connection_thread(_fetch_each, names)
        except sqlite3.Error as exc:
            raise StoreError(f"{self._path}: {', '.join(names)}: {exc}") from exc

    async def _on_connection_thread(self, fn: Callable[..., Result], *args: Any) -> Result:
        """``fn(connection, *args)`` on the connection's own thread, in order with the rest."""
        # aiosqlite runs any function on its thread, in order with its own calls
        with self._in_use():
            return await self._db._execute(fn, self._db._conn, *args)  # type: ignore[no-untyped-call,no-any-return]

    async def _scalar(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row of a small read (:meth:`_read`)."""
        rows = await self._read(name, params)
        return rows[0][0] if rows else None

    async def _scalar_raw(self, sql: str) -> Any:
        with self._in_use():
            async with self._db.execute(sql) as cursor:
                row = await cursor.fetchone()
        return row[0] if row else None

    @asynccontextmanager
    async def _transaction(self, label: str) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; ``label`` names it for the crash points."""
        async with self._writer:
            # Once begun, a transaction runs to its commit or rollback: a BEGIN or statement
            # cancelled half-way would still run in aiosqlite's thread and leave the shared
            # connection inside a transaction nobody owns.
            with anyio.CancelScope(shield=True), self._in_use():
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

    async def _run_transaction(self, label: str, work: Work) -> None:
        """``work`` as one write transaction, in one trip to the connection's thread."""
        async with self._writer:
            with anyio.CancelScope(shield=True):  # as in _transaction
                await self._trip(label, work)

    async def _trip(self, label: str, work: Work) -> None:
        try:
            await self._on_connection_thread(_run_whole, label, work)
        except sqlite3.Error as exc:
            raise StoreError(f"{self._path}: {exc}") from exc

    async def _write_together(self, name: str, row: Mapping[str, Any]) -> None:
        """One row of ``name``, committed with the rows other tasks write meanwhile.

        Each answer to a POST is recorded by its own task; while one transaction commits, the
        rows that arrive wait for the writer together and go in one transaction (one fsync)
        instead of one each. Every caller returns once its row is committed.
        """
        batch = self._batches.get(name)
        if batch is not None:  # a batch is waiting for the writer: join it
            batch.rows.append(row)
            await batch.committed.wait()
            if isinstance(batch.error, StoreError):
                raise StoreError(batch.error.message) from batch.error
            if batch.error is not None:
                raise StoreError(f"{self._path}: {name}: {batch.error}") from batch.error
            return
        batch = self._batches[name] = _Batch([row])
        # shielded: the rows of the tasks that joined are this task's to write
        with anyio.CancelScope(shield=True):
            async with self._writer:
                del self._batches[name]  # closed: later rows wait for the next one

                def write(db: sqlite3.Connection) -> None:
                    db.executemany(QUERIES[name], batch.rows)

                try:
                    await self._trip(name, write)
                except BaseException as exc:  # whatever it was, the joined rows are not written
                    batch.error = exc
                    raise
                finally:
                    batch.committed.set()

    async def _write(self, name: str, rows: Iterable[Mapping[str, Any]]) -> None:
        params = list(rows)

        def write(db: sqlite3.Connection) -> None:
            db.executemany(QUERIES[name], params)

        await self._run_transaction(name, write)

    async def _rows(self, cls: type[Row], name: str, params: Mapping[str, Any]) -> list[Row]:
        """The rows of a small read (:meth:`_read`) as ``cls``."""
        return rows_as(cls, await self._read(name, params))


def _fetch_all(db: sqlite3.Connection, sql: str, params: Mapping[str, Any]) -> list[sqlite3.Row]:
    """Every row, the cursor closed: no read transaction is left open to hold the WAL back."""
    cursor = db.execute(sql, params)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _fetch_each(db: sqlite3.Connection, names: Sequence[str]) -> list[list[sqlite3.Row]]:
    """On the connection's thread: each named read's rows, no cursor left open."""
    return [_fetch_all(db, QUERIES[name], {}) for name in names]


def _run_whole(db: sqlite3.Connection, label: str, work: Work) -> None:
    """On the connection's thread: ``work`` between BEGIN and COMMIT, the crash points around it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        work(db)
    except BaseException as exc:
        db.execute("ROLLBACK")
        # the error goes to the event loop's thread: its frames' cursors are freed here
        traceback.clear_frames(exc.__traceback__)
        raise
    faults.point("store.before_commit", label)
    db.execute("COMMIT")
    faults.point("store.after_commit", label)
