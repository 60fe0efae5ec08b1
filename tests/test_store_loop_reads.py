"""The SQLite store's small reads on the event loop's thread, and when they must not be.

Which thread ran a statement is seen by a trace callback on each connection (SQLite calls it
on the thread that runs the statement); a write is held half-way by a trace callback that
waits on an event the test sets.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from anyio import wait_all_tasks_blocked

from runner.errors import StoreError
from runner.store.base import CallRow
from runner.store.sqlite import SqliteStore, open_sqlite_store
from runner.store.sqlite_plumbing import QUERIES
from runner.store.sqlite_setup import READER_BUSY_TIMEOUT

from .test_store import new_file

pytestmark = pytest.mark.anyio

Read = Callable[[SqliteStore], Awaitable[Any]]


class Threads:
    """The thread each statement ran on, from a trace callback on both connections."""

    def __init__(self) -> None:
        self.ran: list[tuple[int, str]] = []

    def __call__(self, sql: str) -> None:
        self.ran.append((threading.get_ident(), sql))

    def of(self, name: str) -> set[int]:
        """The threads that ran the named statement (its text up to its first parameter)."""
        start = QUERIES[name].split(":", 1)[0]
        return {ident for ident, sql in self.ran if sql.startswith(start)}


async def traced(store: SqliteStore) -> Threads:
    threads = Threads()
    assert store._reader is not None
    store._reader.set_trace_callback(threads)
    await store._db.set_trace_callback(threads)
    return threads


async def ready_store(store: SqliteStore, count: int = 1) -> list[CallRow]:
    files = [new_file(f"wf/{n}.txt") for n in range(count)]
    await store.add_files(files, now=1.0, batch_limits={})
    return await store.ready_calls(now=1.0, limit=10)


SMALL: dict[str, Read] = {
    "ready_calls": lambda s: s.ready_calls(now=1.0, limit=10),
    "due_unknown": lambda s: s.due_unknown(now=1.0, limit=10),
    "due_polls": lambda s: s.due_polls(now=1.0, limit=10),
    "terminal_calls": lambda s: s.terminal_calls(limit=10),
    "rejected_files": lambda s: s.rejected_files(limit=10),
    "delivered_files": lambda s: s.delivered_files(limit=10),
    "files_of_calls": lambda s: s.files_of_calls([1]),
    "call_by_id": lambda s: s.call(1),
    "next_poll_due": lambda s: s.next_poll_due(),
    "next_submit_due": lambda s: s.next_submit_due(),
    "open_call_count": lambda s: s.open_call_count(),
    "collecting_calls": lambda s: s.collecting_calls(),
    "files_by_id": lambda s: s.reuse_sources([1]),
}
WHOLE_STORE: dict[str, Read] = {
    "known_files": lambda s: s.known_files(),
    "count_files": lambda s: s.counts(),
    "unfinished_work": lambda s: s.unfinished_work(),
    "failed_files": lambda s: s.failed_files(),
    "recent_errors": lambda s: s.recent_errors(limit=10),
    "count_webhook_events": lambda s: s.webhook_event_counts(),
}


@pytest.mark.parametrize("name", SMALL)
async def test_a_small_read_with_nothing_outstanding_runs_on_the_event_loops_thread(
    tmp_path: Path, name: str
) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await ready_store(store)
        threads = await traced(store)
        await SMALL[name](store)
        assert threads.of(name) == {threading.get_ident()}


@pytest.mark.parametrize("name", WHOLE_STORE)
async def test_a_read_of_the_whole_store_takes_the_trip_to_aiosqlites_thread(
    tmp_path: Path, name: str
) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await ready_store(store)
        threads = await traced(store)
        await WHOLE_STORE[name](store)
        ran_on = threads.of(name)
        assert len(ran_on) == 1
        assert threading.get_ident() not in ran_on


async def test_a_read_on_the_loop_sees_every_committed_write(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        a, b = await ready_store(store, 2)
        threads = await traced(store)
        await store.mark_sending([a.id], now=2.0)
        assert [c.id for c in await store.ready_calls(now=1.0, limit=10)] == [b.id]
        assert await store.open_call_count() == 1
        assert threads.of("ready_calls") == threads.of("open_call_count") == {threading.get_ident()}


async def read_while_held(
    store: SqliteStore,
    first: Callable[[], Coroutine[Any, Any, object]],
    *,
    held_at: Callable[[str], bool],
    trace: Callable[[str], None] | None = None,
) -> list[CallRow]:
    """A ``ready_calls`` read issued while ``first`` is held on aiosqlite's thread (at the first
    statement ``held_at`` picks, by a trace callback waiting on an event): its answer, after
    checking it did not come while ``first`` was held."""
    entered, release = threading.Event(), threading.Event()

    def hold(sql: str) -> None:  # on aiosqlite's thread
        if trace is not None:
            trace(sql)
        if held_at(sql):
            entered.set()
            release.wait(10)

    await store._db.set_trace_callback(hold)
    seen: list[list[CallRow]] = []

    async def read() -> None:
        seen.append(await store.ready_calls(now=1.0, limit=10))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first)
            assert await anyio.to_thread.run_sync(entered.wait, 10)
            tasks.start_soon(read)
            await wait_all_tasks_blocked()  # a read answered on the loop would be done by now
            assert seen == []  # queued behind what is held, not answered from before it
            release.set()
    [answer] = seen
    return answer


async def test_a_read_issued_while_a_write_runs_waits_behind_it_and_sees_it(
    tmp_path: Path,
) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        [call] = await ready_store(store)
        answer = await read_while_held(
            store,
            partial(store.mark_sending, [call.id], now=2.0),
            held_at=lambda sql: sql.startswith("UPDATE calls SET state = 'sending'"),
        )
        assert answer == []  # the call is sending: the read saw the write


async def test_a_read_issued_while_another_read_runs_on_aiosqlites_thread_goes_there_too(
    tmp_path: Path,
) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await ready_store(store)
        threads = await traced(store)
        counting = QUERIES["count_files"]
        answer = await read_while_held(
            store, store.counts, held_at=lambda sql: sql == counting, trace=threads
        )
        assert len(answer) == 1
        assert len(threads.of("ready_calls")) == 1
        assert threading.get_ident() not in threads.of("ready_calls")


async def test_a_read_inside_an_open_transaction_sees_its_uncommitted_rows(
    tmp_path: Path,
) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        [call] = await ready_store(store)
        async with store._transaction("test") as db:
            await db.execute(QUERIES["mark_sending"], {"id": call.id, "now": 2.0})
            assert await store.ready_calls(now=1.0, limit=10) == []
            assert await store.open_call_count() == 1
            assert (await store.call(call.id)).state == "sending"
        assert await store.ready_calls(now=1.0, limit=10) == []


async def test_a_loop_read_leaves_no_read_transaction_open(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        call, *_ = await ready_store(store, 3)
        await store.mark_sending([call.id], now=2.0)
        threads = await traced(store)
        await store.call(call.id)
        await store.files_of_calls([call.id])
        assert len(await store.ready_calls(now=1.0, limit=10)) == 2
        assert threads.of("ready_calls") == {threading.get_ident()}
        # a reader still inside a read transaction would hold the WAL: it could not be emptied
        await store._db.execute("PRAGMA busy_timeout = 0")
        rows = await store._db.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
        assert tuple(next(iter(rows))) == (0, 0, 0)
        assert path.with_name("s.db-wal").stat().st_size == 0


async def test_the_read_only_store_reads_on_the_loop_through_a_read_only_connection(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as writer:
        [call] = await ready_store(writer)
        async with open_sqlite_store(path, read_only=True) as status:
            threads = await traced(status)
            assert [c.id for c in await status.ready_calls(now=1.0, limit=10)] == [call.id]
            await writer.mark_sending([call.id], now=2.0)
            assert await status.ready_calls(now=1.0, limit=10) == []  # a new read, a new snapshot
            assert await status.open_call_count() == 1
            assert threads.of("ready_calls") == {threading.get_ident()}
            assert status._reader is not None
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                status._reader.execute("DELETE FROM calls")
            assert writer._reader is not None
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                writer._reader.execute("DELETE FROM calls")


async def test_an_error_on_the_loop_is_a_store_error_as_on_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await ready_store(store)
        await store._db.execute("ALTER TABLE calls RENAME TO calls_gone")
        # nothing outstanding: the loop's read (a statement that cannot be prepared is not traced)
        with pytest.raises(StoreError) as on_loop:
            await store.ready_calls(now=1.0, limit=10)
        assert str(on_loop.value) == f"{path}: ready_calls: no such table: calls"
        with pytest.raises(StoreError) as on_thread:  # the same read through aiosqlite's thread
            await store._fetch("ready_calls", {"now": 1.0, "limit": 10})
        assert str(on_thread.value) == str(on_loop.value)
        await store._db.execute("ALTER TABLE calls_gone RENAME TO calls")


async def test_a_locked_file_sends_the_read_to_aiosqlites_thread_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        [call] = await ready_store(store)
    # out of WAL, a writing transaction locks readers out of the whole file
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("PRAGMA journal_mode = DELETE")
        async with open_sqlite_store(path, read_only=True) as status:
            threads = await traced(status)
            other.execute("BEGIN EXCLUSIVE")
            other.execute("UPDATE calls SET state = 'sending' WHERE id = ?", (call.id,))
            seen: list[list[CallRow]] = []

            async def read() -> None:
                seen.append(await status.ready_calls(now=1.0, limit=10))

            # the loop gives up on a lock after READER_BUSY_TIMEOUT, not aiosqlite's five seconds
            assert status._reader is not None
            [(waits_ms,)] = status._reader.execute("PRAGMA busy_timeout").fetchall()
            assert waits_ms == READER_BUSY_TIMEOUT * 1000
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(read)
                    await wait_all_tasks_blocked()  # the read met the lock, then queued
                    assert seen == []
                    other.execute("COMMIT")
            assert seen == [[]]
            assert len(threads.of("ready_calls") - {threading.get_ident()}) == 1
