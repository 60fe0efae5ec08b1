"""The store contract: what every :class:`runner.store.base.Store` promises, whatever its engine.

One suite, run on each store factory. It follows the lives drawn in ``store/base.py`` — a call
(one bem call) ``open → ready → sending → polling → terminal → done``, with ``unknown`` and the
way back to ``ready``; a file ``queued | rejected → delivered → done``, ``retried`` as history —
and checks what the stages read back: orders, pages, counts, names as exact bytes, and what is
left after a crash between any two writes (every write is closed and reopened from disk).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.errors import StoreError
from runner.names import from_raw, raw, shown
from runner.route import Destination
from runner.store.base import (
    BatchLimits,
    CallRow,
    Counts,
    Delivery,
    FileRow,
    Finished,
    KnownFile,
    NewFile,
    NextPoll,
    Settled,
    Store,
)
from runner.store.postgres import PostgresStore, open_postgres_store
from runner.store.sqlite import SqliteStore, open_sqlite_store

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]

# mypy proves that each store satisfies the protocol
_sqlite_is_a_store: type[Store] = SqliteStore
_postgres_is_a_store: type[Store] = PostgresStore


class StoreFactory(Protocol):
    """Opens the same store again and again: each open is a process start."""

    name: str

    def open(self) -> AbstractAsyncContextManager[Store]: ...


@dataclass
class SqliteFactory:
    path: Path
    name: str = "sqlite"

    def open(self) -> AbstractAsyncContextManager[Store]:
        return open_sqlite_store(self.path)


@dataclass
class PostgresFactory:
    url: str
    runner_id: str | None = None
    name: str = "postgresql"

    def open(self) -> AbstractAsyncContextManager[Store]:
        return open_postgres_store(self.url, runner_id=self.runner_id)


STORE_KINDS = ["sqlite", "postgresql", "postgresql-shared"]
"""PostgreSQL owned by one runner, and shared: joined as a runner, with claims and fencing on."""


@pytest.fixture(params=STORE_KINDS)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Each test has an empty store of its own: a file, or a database of a shared cluster."""
    if request.param == "sqlite":
        return SqliteFactory(tmp_path / "state.db")
    runner_id = "runner-1" if request.param == "postgresql-shared" else None
    return PostgresFactory(request.getfixturevalue("postgres_url"), runner_id)


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    async with store_factory.open() as opened:
        yield opened


# -- building blocks -------------------------------------------------------------------------


def new_file(
    rel: str,
    *,
    mode: str = "file",
    key: str | None = None,
    size: int = 10,
    mtime_ns: int = 1,
    reason: str | None = None,
    routed: bool = True,
) -> NewFile:
    workflow = "wf"
    if key is None:
        key = rel if mode == "file" else rel.rsplit("/", 1)[0]
    # bem takes only valid Unicode, so the item reference is the name as shown
    item = shown(rel.rsplit("/", 1)[-1])
    destination = Destination(workflow, mode, key, item)  # type: ignore[arg-type]
    return NewFile(
        rel=rel,
        size=size,
        mtime_ns=mtime_ns,
        sha256="ab" * 32,
        input_type="text",
        destination=destination if routed else None,
        reason=reason,
    )


def folder_files(folder: str, count: int, *, size: int = 10) -> list[NewFile]:
    return [new_file(f"{folder}/{n}.txt", mode="folder", size=size) for n in range(count)]


def window_files(key: str, count: int, *, sizes: list[int] | None = None) -> list[NewFile]:
    sizes = sizes or [10] * count
    return [
        new_file(f"w/{key}-{n}.txt", mode="window", key=key, size=size)
        for n, size in enumerate(sizes)
    ]


async def add(
    store: Store, files: list[NewFile], *, now: float = 1.0, limits: BatchLimits | None = None
) -> None:
    await store.add_files(files, now=now, batch_limits=limits or {})


async def one_ready(store: Store, rel: str, *, now: float = 1.0) -> CallRow:
    """A file-mode file, taken: its call is born ready."""
    await add(store, [new_file(rel)], now=now)
    (call,) = [g for g in await store.ready_calls(now=now, limit=1000) if g.batch_key == rel]
    return call


async def the_file(store: Store, call_row_id: int) -> FileRow:
    (file,) = (await store.files_of_calls([call_row_id]))[call_row_id]
    return file


async def to_polling(store: Store, call: CallRow, *, call_id: str = "c1") -> CallRow:
    await store.mark_sending([call.id], now=2.0)
    await store.mark_submitted(call.id, call_id=call_id, status="pending", now=3.0, next_poll=4.0)
    return await store.call(call.id)


async def to_terminal(store: Store, call: CallRow, *, status: str = "completed") -> CallRow:
    await to_polling(store, call)
    await store.mark_terminal([Finished(call.id, status, '{"status": "x"}', None)], now=5.0)
    return await store.call(call.id)


async def deliver_all(store: Store, call: CallRow, *, outcome: str = "result") -> None:
    files = (await store.files_of_calls([call.id]))[call.id]
    await store.mark_delivered(
        [Delivery(f.id, outcome, None) for f in files], finished_calls=[call.id], now=6.0
    )


# -- a call's life --------------------------------------------------------------------------


async def test_a_file_mode_file_is_a_ready_call_of_its_own(store: Store) -> None:
    await add(store, [new_file("wf/a.txt", size=7), new_file("wf/b.txt", size=9)], now=100.0)
    a, b = await store.ready_calls(now=100.0, limit=10)
    assert [(g.batch_key, g.mode, g.workflow) for g in (a, b)] == [
        ("wf/a.txt", "file", "wf"),
        ("wf/b.txt", "file", "wf"),
    ]
    assert not a.batch
    assert (a.file_count, a.byte_count, b.byte_count) == (1, 7, 9)
    assert (a.opened_at, a.last_added_at, a.not_before, a.attempts) == (100.0, 100.0, 0, 0)
    assert (a.sent_at, a.submitted_at, a.call_id, a.status, a.finished_at) == (None,) * 5
    assert a.call_reference_id.startswith("bemr-")
    assert a.call_reference_id != b.call_reference_id
    assert await store.collecting_calls() == []
    file = await the_file(store, a.id)
    assert (file.rel, file.state, file.call_row_id, file.size, file.seen_at) == (
        "wf/a.txt",
        "queued",
        a.id,
        7,
        100.0,
    )
    assert (file.workflow, file.item_reference_id, file.input_type) == ("wf", "a.txt", "text")
    assert (file.sha256, file.mtime_ns, file.outcome, file.reason) == ("ab" * 32, 1, None, None)


async def test_folder_files_share_one_collecting_call_until_it_is_closed(store: Store) -> None:
    await add(store, folder_files("wf/f1", 2), now=1.0)
    await add(store, [new_file("wf/f1/late.txt", mode="folder", size=5)], now=4.0)
    (call,) = await store.collecting_calls()
    assert (call.state, call.mode, call.batch_key, call.batch) == (
        "collecting",
        "folder",
        "wf/f1",
        True,
    )
    assert (call.file_count, call.byte_count) == (3, 25)
    assert (call.opened_at, call.last_added_at) == (1.0, 4.0)
    assert await store.ready_calls(now=10.0, limit=10) == []
    assert await store.next_submit_due() is None

    await store.close_batch(call.id)
    assert await store.collecting_calls() == []
    (ready,) = await store.ready_calls(now=0.0, limit=10)  # due at once
    assert (ready.id, ready.state, ready.not_before) == (call.id, "ready", 0)
    assert await store.next_submit_due() == 0
    # a file arriving after the close starts a new call for the same folder
    await add(store, [new_file("wf/f1/later.txt", mode="folder")], now=5.0)
    (again,) = await store.collecting_calls()
    assert again.id != call.id
    assert again.call_reference_id != call.call_reference_id
    assert again.file_count == 1


async def test_closing_a_call_that_is_not_collecting_changes_nothing(store: Store) -> None:
    call = await one_ready(store, "wf/a.txt")
    polling = await to_polling(store, call)
    await store.close_batch(call.id)
    assert await store.call(call.id) == polling


async def test_folder_batches_are_kept_apart_by_key(store: Store) -> None:
    await add(store, [*folder_files("wf/a", 2), *folder_files("wf/b", 1)])
    calls = await store.collecting_calls()
    assert [(g.batch_key, g.file_count) for g in calls] == [("wf/a", 2), ("wf/b", 1)]


async def test_the_whole_life_of_a_call(store: Store) -> None:
    call = await one_ready(store, "wf/a.txt")
    await store.mark_sending([call.id], now=2.0)
    sending = await store.call(call.id)
    assert (sending.state, sending.sent_at, sending.attempts) == ("sending", 2.0, 1)
    assert await store.ready_calls(now=99.0, limit=10) == []
    assert await store.open_call_count() == 1

    await store.mark_submitted(call.id, call_id="c1", status="pending", now=3.0, next_poll=4.0)
    polling = await store.call(call.id)
    assert (polling.state, polling.call_id, polling.status) == ("polling", "c1", "pending")
    assert (polling.submitted_at, polling.not_before, polling.attempts) == (3.0, 4.0, 0)
    assert await store.next_poll_due() == 4.0
    assert await store.due_polls(now=3.9, limit=10) == []
    (due,) = await store.due_polls(now=4.0, limit=10)
    assert due.id == call.id

    await store.reschedule_polls([NextPoll(call.id, 10.0, "running")])
    rescheduled = await store.call(call.id)
    assert (rescheduled.not_before, rescheduled.status, rescheduled.attempts) == (
        10.0,
        "running",
        1,
    )
    assert await store.next_poll_due() == 10.0

    await store.mark_terminal([Finished(call.id, "completed", '{"a": 1}', None)], now=11.0)
    terminal = await store.call(call.id)
    assert (terminal.state, terminal.status, terminal.result_json) == (
        "terminal",
        "completed",
        '{"a": 1}',
    )
    assert (terminal.finished_at, terminal.error_reason, terminal.not_before) == (11.0, None, 0)
    assert await store.open_call_count() == 0
    assert await store.next_poll_due() is None
    assert [g.id for g in await store.terminal_calls(limit=10)] == [call.id]

    file = await the_file(store, call.id)
    await store.mark_delivered([], finished_calls=[call.id], now=11.5)
    assert (await store.call(call.id)).state == "terminal"  # its file has no document yet
    await store.mark_delivered(
        [Delivery(file.id, "result", None)], finished_calls=[call.id], now=12.0
    )
    assert (await store.call(call.id)).state == "done"
    assert await store.terminal_calls(limit=10) == []
    (delivered,) = await store.delivered_files(limit=10)
    assert (delivered.state, delivered.outcome, delivered.delivered_at) == (
        "delivered",
        "result",
        12.0,
    )
    assert await store.unfinished_work() == 1  # the input is not archived yet

    await store.mark_done([file.id], now=13.0)
    done = await the_file(store, call.id)
    assert (done.state, done.done_at) == ("done", 13.0)
    assert await store.delivered_files(limit=10) == []
    assert await store.unfinished_work() == 0
    assert (await store.counts()).files == {"done:result": 1}
    assert await store.known_files() == {"wf/a.txt": KnownFile(10, 1, "done")}


async def test_an_unknown_outcome_is_resolved_by_adoption(store: Store) -> None:
    call = await one_ready(store, "wf/a.txt")
    await store.mark_sending([call.id], now=2.0)
    await store.mark_unknown([call.id], not_before=5.0)
    unknown = await store.call(call.id)
    assert (unknown.state, unknown.not_before, unknown.sent_at) == ("unknown", 5.0, 2.0)
    assert await store.open_call_count() == 1  # it may exist at bem
    assert await store.ready_calls(now=99.0, limit=10) == []  # never resent blindly
    assert await store.due_unknown(now=4.9, limit=10) == []
    assert [g.id for g in await store.due_unknown(now=5.0, limit=10)] == [call.id]
    assert await store.next_submit_due() == 5.0  # listing is the submitter's work

    await store.mark_submitted(call.id, call_id="found", status="running", now=6.0, next_poll=7.0)
    adopted = await store.call(call.id)
    assert (adopted.state, adopted.call_id, adopted.submitted_at) == ("polling", "found", 6.0)
    assert await store.due_unknown(now=99.0, limit=10) == []


async def test_an_unknown_outcome_never_created_goes_back_to_ready(store: Store) -> None:
    call = await one_ready(store, "wf/a.txt")
    await store.mark_sending([call.id], now=2.0)
    await store.mark_unknown([call.id], not_before=3.0)
    await store.mark_submit_later([call.id], not_before=8.0)
    ready = await store.call(call.id)
    assert (ready.state, ready.not_before, ready.attempts) == ("ready", 8.0, 1)
    assert await store.open_call_count() == 0
    assert await store.due_unknown(now=99.0, limit=10) == []
    assert await store.ready_calls(now=7.9, limit=10) == []
    assert [g.id for g in await store.ready_calls(now=8.0, limit=10)] == [call.id]
    # sent again: the attempts count on, the reference stays the same
    await store.mark_sending([call.id], now=9.0)
    again = await store.call(call.id)
    assert (again.attempts, again.sent_at) == (2, 9.0)
    assert again.call_reference_id == call.call_reference_id


async def test_a_retried_send_waits_and_counts_its_attempts(store: Store) -> None:
    call = await one_ready(store, "wf/a.txt")
    for attempt in (1, 2, 3):
        await store.mark_sending([call.id], now=float(attempt))
        await store.mark_submit_later([call.id], not_before=attempt + 10.0)
        later = await store.call(call.id)
        assert (later.state, later.attempts, later.not_before) == ("ready", attempt, attempt + 10.0)
    assert await store.next_submit_due() == 13.0
    await store.mark_sending([call.id], now=20.0)
    await store.mark_submitted(call.id, call_id="c", status=None, now=21.0, next_poll=22.0)
    assert (await store.call(call.id)).attempts == 0  # polls count from zero


async def test_submitted_at_is_the_first_submission(store: Store) -> None:
    call = await to_polling(store, await one_ready(store, "wf/a.txt"))
    await store.mark_submitted(call.id, call_id="c1", status="running", now=30.0, next_poll=31.0)
    assert (await store.call(call.id)).submitted_at == 3.0


async def test_a_call_being_sent_is_confirmed_just_before_its_post(store: Store) -> None:
    call = await one_ready(store, "wf/a.txt")
    await store.mark_sending([call.id], now=2.0)
    await store.confirm_sending([call.id], now=3.0)
    sending = await store.call(call.id)
    assert (sending.state, sending.attempts) == ("sending", 1)


async def test_a_call_bem_rejects_ends_terminal_from_sending(store: Store) -> None:
    call = await one_ready(store, "wf/a.txt")
    await store.mark_sending([call.id], now=2.0)
    await store.mark_terminal([Finished(call.id, "failed", None, "bem rejected it")], now=3.0)
    terminal = await store.call(call.id)
    assert (terminal.state, terminal.status, terminal.error_reason, terminal.result_json) == (
        "terminal",
        "failed",
        "bem rejected it",
        None,
    )
    assert (terminal.call_id, terminal.finished_at) == (None, 3.0)
    assert await store.open_call_count() == 0


async def test_a_poll_page_ends_some_calls_and_reschedules_the_others(store: Store) -> None:
    a = await to_polling(store, await one_ready(store, "wf/a.txt"), call_id="ca")
    b = await to_polling(store, await one_ready(store, "wf/b.txt"), call_id="cb")
    await store.record_polls(
        [Finished(a.id, "failed", None, "timed out")], [NextPoll(b.id, 9.0, "running")], now=5.0
    )
    ended, followed = await store.call(a.id), await store.call(b.id)
    assert (ended.state, ended.error_reason, ended.finished_at) == ("terminal", "timed out", 5.0)
    assert (followed.state, followed.not_before, followed.status, followed.attempts) == (
        "polling",
        9.0,
        "running",
        1,
    )
    # a page where nothing ended only reschedules
    await store.record_polls([], [NextPoll(b.id, 12.0, None)], now=10.0)
    followed = await store.call(b.id)
    assert (followed.state, followed.not_before, followed.status, followed.attempts) == (
        "polling",
        12.0,
        None,
        2,
    )


async def test_recover_turns_only_sending_into_unknown_due_at_once(store: Store) -> None:
    sending = await one_ready(store, "wf/sending.txt")
    await store.mark_sending([sending.id], now=2.0)
    ready = await one_ready(store, "wf/ready.txt")
    await store.mark_submit_later([ready.id], not_before=50.0)
    polling = await to_polling(store, await one_ready(store, "wf/polling.txt"))
    unknown = await one_ready(store, "wf/unknown.txt")
    await store.mark_sending([unknown.id], now=2.0)
    await store.mark_unknown([unknown.id], not_before=40.0)
    before = {g.id: await store.call(g.id) for g in (ready, polling, unknown)}

    await store.recover()
    recovered = await store.call(sending.id)
    assert (recovered.state, recovered.not_before, recovered.sent_at) == ("unknown", 0, 2.0)
    assert recovered.call_reference_id == sending.call_reference_id
    assert {gid: await store.call(gid) for gid in before} == before
    assert [g.id for g in await store.due_unknown(now=0.0, limit=10)] == [sending.id]
    await store.recover()  # again: nothing more changes
    assert await store.call(sending.id) == recovered


async def test_drop_empty_call_ends_it_without_a_call(store: Store) -> None:
    await add(store, folder_files("wf/f", 1))
    (call,) = await store.collecting_calls()
    await store.close_batch(call.id)
    await store.supersede_file(await the_file(store, call.id))
    await store.drop_empty_call(call.id)
    dropped = await store.call(call.id)
    assert (dropped.state, dropped.call_id) == ("done", None)
    assert dropped.error_reason
    assert await store.ready_calls(now=99.0, limit=10) == []
    assert await store.next_submit_due() is None
    assert await store.files_of_calls([call.id]) == {call.id: []}
    assert await store.unfinished_work() == 0
    assert (await store.counts()).calls == {"done": 1}


async def test_a_finished_call_with_an_undelivered_file_is_not_done(store: Store) -> None:
    await add(store, folder_files("wf/f", 2))
    (call,) = await store.collecting_calls()
    await store.close_batch(call.id)
    await to_terminal(store, await store.call(call.id))
    first, _ = (await store.files_of_calls([call.id]))[call.id]
    await store.mark_delivered(
        [Delivery(first.id, "result", None)], finished_calls=[call.id], now=6.0
    )
    assert (await store.call(call.id)).state == "terminal"
    await deliver_all(store, call)
    assert (await store.call(call.id)).state == "done"


# -- a file's life ---------------------------------------------------------------------------


async def test_a_rejected_file_waits_for_its_error_document(store: Store) -> None:
    await add(
        store,
        [
            new_file("wf/empty.txt", reason="empty file"),
            new_file("x/unrouted.txt", routed=False, reason="no route"),
        ],
    )
    empty, unrouted = await store.rejected_files(limit=10)
    assert (empty.rel, empty.state, empty.reason, empty.call_row_id) == (
        "wf/empty.txt",
        "rejected",
        "empty file",
        None,
    )
    assert (empty.workflow, empty.item_reference_id) == ("wf", "empty.txt")
    assert (unrouted.workflow, unrouted.item_reference_id, unrouted.reason) == (
        None,
        None,
        "no route",
    )
    assert await store.ready_calls(now=99.0, limit=10) == []
    assert await store.collecting_calls() == []
    assert (await store.counts()).calls == {}
    assert await store.unfinished_work() == 2
    assert (await store.known_files())["wf/empty.txt"].state == "rejected"

    # delivering keeps the reason it was rejected for, unless the delivery gives one
    await store.mark_delivered(
        [Delivery(empty.id, "error", None), Delivery(unrouted.id, "error", "no route at all")],
        finished_calls=[],
        now=3.0,
    )
    assert await store.rejected_files(limit=10) == []
    empty, unrouted = await store.delivered_files(limit=10)
    assert (empty.outcome, empty.reason, unrouted.reason) == (
        "error",
        "empty file",
        "no route at all",
    )
    await store.mark_done([empty.id, unrouted.id], now=4.0)
    assert await store.unfinished_work() == 0
    assert (await store.counts()).files == {"done:error": 2}


async def test_a_queued_file_that_vanished_is_rejected_and_leaves_its_call(store: Store) -> None:
    await add(store, folder_files("wf/f", 3, size=10))
    (call,) = await store.collecting_calls()
    gone = (await store.files_of_calls([call.id]))[call.id][1]
    await store.reject_queued_file(gone, "the file vanished")
    shrunk = await store.call(call.id)
    assert (shrunk.file_count, shrunk.byte_count) == (2, 20)
    assert gone.id not in {f.id for f in (await store.files_of_calls([call.id]))[call.id]}
    (rejected,) = await store.rejected_files(limit=10)
    assert (rejected.id, rejected.reason, rejected.call_row_id) == (
        gone.id,
        "the file vanished",
        None,
    )
    # the call can now finish without it
    await store.close_batch(call.id)
    await to_terminal(store, await store.call(call.id))
    await deliver_all(store, call)
    assert (await store.call(call.id)).state == "done"


async def test_a_file_changed_after_it_was_queued_is_superseded(store: Store) -> None:
    await add(store, folder_files("wf/f", 2, size=10))
    (call,) = await store.collecting_calls()
    changed, kept = (await store.files_of_calls([call.id]))[call.id]
    await store.supersede_file(changed)
    shrunk = await store.call(call.id)
    assert (shrunk.file_count, shrunk.byte_count) == (1, 10)
    assert (await store.files_of_calls([call.id]))[call.id] == [kept]
    # the path is no longer known, so intake takes it anew; the old row is history
    assert changed.rel not in await store.known_files()
    assert (await store.counts()).files == {"queued": 1, "retried": 1}
    await add(store, [new_file(changed.rel, mode="folder", size=12, mtime_ns=2)], now=2.0)
    assert (await store.known_files())[changed.rel] == KnownFile(12, 2, "queued")
    assert await store.unfinished_work() == 3  # the call and two queued files


async def test_a_path_has_at_most_one_unfinished_row(
    store: Store, request: pytest.FixtureRequest
) -> None:
    shared = request.node.callspec.params["store_factory"] == "postgresql-shared"
    await add(store, [new_file("wf/rejected.txt", reason="empty")])
    call = await one_ready(store, "wf/a.txt")

    async def taking_again_fails(rel: str, state: str) -> None:
        before = await store.counts()
        if shared:  # every runner scans the inbox: a path another one took is left out
            await add(store, [new_file(rel)], now=2.0)
        else:
            with pytest.raises(StoreError):
                await add(store, [new_file("wf/other.txt"), new_file(rel)], now=2.0)
        # the failed batch left nothing behind, not even its first file
        assert await store.counts() == before
        assert (await store.known_files())[rel].state == state

    await taking_again_fails("wf/a.txt", "queued")
    await taking_again_fails("wf/rejected.txt", "rejected")
    await to_terminal(store, call)
    await deliver_all(store, call)
    await taking_again_fails("wf/a.txt", "delivered")


async def test_a_finished_path_can_be_taken_again_and_the_latest_row_is_known(
    store: Store,
) -> None:
    call = await to_terminal(store, await one_ready(store, "wf/a.txt"))
    await deliver_all(store, call)
    await store.mark_done([(await the_file(store, call.id)).id], now=7.0)
    await add(store, [new_file("wf/a.txt", size=20, mtime_ns=5)], now=8.0)
    assert await store.known_files() == {"wf/a.txt": KnownFile(20, 5, "queued")}
    assert (await store.counts()).files == {"done:result": 1, "queued": 1}


async def test_retry_retires_failed_files_so_they_can_come_back(store: Store) -> None:
    call = await to_terminal(store, await one_ready(store, "wf/bad.txt"), status="failed")
    await deliver_all(store, call, outcome="error")
    await add(store, [new_file("wf/rej.txt", reason="empty")], now=2.0)
    rejected = (await store.rejected_files(limit=10))[0]
    await store.mark_delivered([Delivery(rejected.id, "error", None)], finished_calls=[], now=3.0)
    ok = await to_terminal(store, await one_ready(store, "wf/ok.txt"))
    await deliver_all(store, ok)
    files = [await the_file(store, call.id), rejected, await the_file(store, ok.id)]
    await store.mark_done([f.id for f in files], now=9.0)

    failed = await store.failed_files()
    assert [(f.rel, f.outcome) for f in failed] == [
        ("wf/bad.txt", "error"),
        ("wf/rej.txt", "error"),
    ]
    assert [rel for rel, _, _ in await store.recent_errors(limit=10)] == [
        "wf/rej.txt",
        "wf/bad.txt",
    ]
    await store.mark_retried([f.id for f in failed])
    assert await store.failed_files() == []
    assert set(await store.known_files()) == {"wf/ok.txt"}
    assert (await store.counts()).files == {"done:result": 1, "retried": 2}
    await add(store, [new_file("wf/bad.txt", mtime_ns=9)], now=10.0)
    assert (await store.known_files())["wf/bad.txt"] == KnownFile(10, 9, "queued")


async def test_empty_writes_change_nothing(store: Store) -> None:
    call = await one_ready(store, "wf/a.txt")
    before = await store.counts()
    await store.add_files([], now=2.0, batch_limits={})
    await store.mark_sending([], now=2.0)
    await store.mark_submit_later([], not_before=2.0)
    await store.mark_unknown([], not_before=2.0)
    await store.mark_terminal([], now=2.0)
    await store.record_polls([], [], now=2.0)
    await store.reschedule_polls([])
    await store.mark_delivered([], finished_calls=[], now=2.0)
    await store.mark_done([], now=2.0)
    await store.mark_retried([])
    assert await store.counts() == before
    assert await store.call(call.id) == call
    assert await store.files_of_calls([]) == {}


async def test_an_unknown_call_row_id_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.call(424242)


async def test_a_new_store_is_empty_and_sound(store: Store) -> None:
    assert await store.counts() == Counts(files={}, calls={}, open_calls=0)
    assert await store.unfinished_work() == 0
    assert await store.known_files() == {}
    assert await store.next_poll_due() is None
    assert await store.next_submit_due() is None
    assert await store.integrity_check() == "ok"


# -- window batches --------------------------------------------------------------------------


async def test_a_window_closes_when_the_next_file_would_pass_max_files(store: Store) -> None:
    await add(store, window_files("window:0", 5), limits={"window:0": (2, 10**9)})
    ready = await store.ready_calls(now=1.0, limit=10)
    assert [g.file_count for g in ready] == [2, 2]
    (still_open,) = await store.collecting_calls()
    assert (still_open.file_count, still_open.batch_key) == (1, "window:0")
    calls = await store.files_of_calls([g.id for g in [*ready, still_open]])
    assert [[f.rel for f in calls[g.id]] for g in [*ready, still_open]] == [
        ["w/window:0-0.txt", "w/window:0-1.txt"],
        ["w/window:0-2.txt", "w/window:0-3.txt"],
        ["w/window:0-4.txt"],
    ]


async def test_a_window_closes_when_the_next_file_would_pass_max_bytes(store: Store) -> None:
    limits = {"window:0": (100, 25)}
    await add(store, window_files("window:0", 5, sizes=[10, 15, 1, 30, 10]), limits=limits)
    ready = await store.ready_calls(now=1.0, limit=10)
    (still_open,) = await store.collecting_calls()
    # 10+15 fits exactly; 1 starts anew; 30 alone is too big for any call and goes alone
    assert [(g.file_count, g.byte_count) for g in ready] == [(2, 25), (1, 1), (1, 30)]
    assert (still_open.file_count, still_open.byte_count) == (1, 10)


async def test_window_limits_hold_across_separate_intake_passes(store: Store) -> None:
    limits = {"window:0": (3, 10**9)}
    for n in range(7):
        await add(
            store,
            [new_file(f"w/{n}.txt", mode="window", key="window:0")],
            now=float(n),
            limits=limits,
        )
    ready = await store.ready_calls(now=99.0, limit=10)
    (still_open,) = await store.collecting_calls()
    assert [g.file_count for g in ready] == [3, 3]
    assert (still_open.file_count, still_open.opened_at) == (1, 6.0)
    assert [g.opened_at for g in ready] == [0.0, 3.0]


async def test_window_limits_apply_per_key_and_only_to_listed_keys(store: Store) -> None:
    files = [*window_files("window:0", 4), *window_files("window:1", 4), *folder_files("wf/f", 4)]
    await add(store, files, limits={"window:0": (2, 10**9), "window:1": (3, 10**9)})
    ready = await store.ready_calls(now=1.0, limit=10)
    assert sorted((g.batch_key, g.file_count) for g in ready) == [("window:0", 2), ("window:1", 3)]
    still_open = await store.collecting_calls()
    assert sorted((g.batch_key, g.file_count) for g in still_open) == [
        ("wf/f", 4),
        ("window:0", 2),
        ("window:1", 1),
    ]


# -- orders and pages ------------------------------------------------------------------------


async def test_ready_calls_come_by_due_time_then_age_a_page_at_a_time(store: Store) -> None:
    calls = [await one_ready(store, f"wf/{n}.txt") for n in range(5)]
    await store.mark_submit_later([calls[0].id], not_before=3.0)
    await store.mark_submit_later([calls[3].id], not_before=2.0)
    order = [calls[n].id for n in (1, 2, 4, 3, 0)]
    assert [g.id for g in await store.ready_calls(now=1.0, limit=10)] == order[:3]
    seen: list[int] = []
    while page := await store.ready_calls(now=5.0, limit=2):
        assert len(page) <= 2
        seen += [g.id for g in page]
        await store.mark_sending([g.id for g in page], now=5.0)
    assert seen == order


async def test_due_polls_come_by_due_time_a_page_at_a_time(store: Store) -> None:
    calls = [await to_polling(store, await one_ready(store, f"wf/{n}.txt")) for n in range(5)]
    for n, call in enumerate(calls):
        await store.reschedule_polls([NextPoll(call.id, 10.0 + (n * 3) % 5, None)])
    due_times = [10.0 + (n * 3) % 5 for n in range(5)]
    expected = [g.id for _, g in sorted(zip(due_times, calls, strict=True), key=lambda p: p[0])]
    assert [g.id for g in await store.due_polls(now=11.0, limit=10)] == expected[:2]
    seen: list[int] = []
    while page := await store.due_polls(now=20.0, limit=2):
        assert len(page) <= 2
        seen += [g.id for g in page]
        await store.reschedule_polls([NextPoll(g.id, 100.0, None) for g in page])
    assert seen == expected
    assert await store.next_poll_due() == 100.0


async def test_due_unknown_comes_by_age_a_page_at_a_time(store: Store) -> None:
    calls = [await one_ready(store, f"wf/{n}.txt") for n in range(5)]
    await store.mark_sending([g.id for g in calls], now=2.0)
    await store.mark_unknown([g.id for g in reversed(calls)], not_before=3.0)
    assert await store.next_submit_due() == 3.0
    seen: list[int] = []
    while page := await store.due_unknown(now=3.0, limit=2):
        assert len(page) <= 2
        seen += [g.id for g in page]
        await store.mark_unknown([g.id for g in page], not_before=50.0)
    assert seen == [g.id for g in calls]


async def test_terminal_calls_come_by_finish_time_a_page_at_a_time(store: Store) -> None:
    calls = [await to_polling(store, await one_ready(store, f"wf/{n}.txt")) for n in range(5)]
    finish = [7.0, 5.0, 9.0, 5.0, 6.0]
    for call, at in zip(calls, finish, strict=True):
        await store.mark_terminal([Finished(call.id, "completed", None, None)], now=at)
    expected = [calls[n].id for n in (1, 3, 4, 0, 2)]
    seen: list[int] = []
    while page := await store.terminal_calls(limit=2):
        assert len(page) <= 2
        seen += [g.id for g in page]
        for call in page:
            await deliver_all(store, call)
    assert seen == expected


async def test_file_lists_come_by_age_a_page_at_a_time(store: Store) -> None:
    await add(store, [new_file(f"wf/r{n}.txt", reason=f"bad {n}") for n in range(5)])
    rejected = await store.rejected_files(limit=10)
    ids = [f.id for f in rejected]
    assert ids == sorted(ids)
    assert [f.rel for f in await store.rejected_files(limit=3)] == [
        f"wf/r{n}.txt" for n in range(3)
    ]
    seen: list[int] = []
    while page := await store.rejected_files(limit=2):
        seen += [f.id for f in page]
        await store.mark_delivered(
            [Delivery(f.id, "error", None) for f in page], finished_calls=[], now=2.0
        )
    assert seen == ids
    seen = []
    while page := await store.delivered_files(limit=2):
        seen += [f.id for f in page]
        await store.mark_done([f.id for f in page], now=3.0)
    assert seen == ids
    errors = await store.recent_errors(limit=3)
    assert errors == [(f"wf/r{n}.txt", f"bad {n}", 3.0) for n in (4, 3, 2)]
    assert [f.id for f in await store.failed_files()] == ids


async def test_files_of_calls_answers_for_every_call_asked(store: Store) -> None:
    await add(store, [*folder_files("wf/a", 3), *folder_files("wf/b", 2)])
    a, b = await store.collecting_calls()
    files = await store.files_of_calls([b.id, a.id, 999_999])
    assert set(files) == {a.id, b.id, 999_999}
    assert [f.rel for f in files[a.id]] == ["wf/a/0.txt", "wf/a/1.txt", "wf/a/2.txt"]
    assert [f.rel for f in files[b.id]] == ["wf/b/0.txt", "wf/b/1.txt"]
    assert files[999_999] == []
    assert all(f.call_row_id == a.id for f in files[a.id])


# -- counts ----------------------------------------------------------------------------------


async def test_counts_open_calls_and_unfinished_work_follow_every_state(store: Store) -> None:
    await add(store, folder_files("wf/open", 2))  # a collecting call, 2 queued
    await one_ready(store, "wf/ready.txt")
    sending = await one_ready(store, "wf/sending.txt")
    await store.mark_sending([sending.id], now=2.0)
    unknown = await one_ready(store, "wf/unknown.txt")
    await store.mark_sending([unknown.id], now=2.0)
    await store.mark_unknown([unknown.id], not_before=3.0)
    await to_polling(store, await one_ready(store, "wf/polling.txt"))
    await to_terminal(store, await one_ready(store, "wf/terminal.txt"), status="failed")
    done = await to_terminal(store, await one_ready(store, "wf/done.txt"))
    await deliver_all(store, done)
    await store.mark_done([(await the_file(store, done.id)).id], now=7.0)
    failed = await to_terminal(store, await one_ready(store, "wf/failed.txt"), status="failed")
    await deliver_all(store, failed, outcome="error")
    await add(store, [new_file("wf/rejected.txt", reason="empty")])

    counts = await store.counts()
    assert counts.calls == {
        "collecting": 1,
        "ready": 1,
        "sending": 1,
        "unknown": 1,
        "polling": 1,
        "terminal": 1,
        "done": 2,
    }
    assert counts.files == {"queued": 7, "rejected": 1, "delivered:error": 1, "done:result": 1}
    assert counts.open_calls == 3 == await store.open_call_count()
    # every call not done, and every file not done
    assert await store.unfinished_work() == 6 + 9


# -- names are bytes -------------------------------------------------------------------------

STRANGE_NAMES = [
    b"caf\xc3\xa9.txt",  # UTF-8, composed
    b"cafe\xcc\x81.txt",  # UTF-8, decomposed: another name
    b"caf\xe9.txt",  # Latin-1: not UTF-8
    b"\xff\xfe.txt",
    b"\xed\xa0\x80.txt",  # an encoded surrogate: not UTF-8 either
    b"caf\\xe9.txt",  # how the Latin-1 one is shown: yet another name
    b"CAF\xc3\x89.txt",  # differs only in case
    b"tab\tnew\nline\r.txt",
    b"quote'\"%_*?[].txt",
    b"\xf0\x9f\x93\x84 emoji.txt",
    b"x" * 200 + b".txt",
]


async def test_strange_names_come_back_as_the_same_bytes_and_stay_distinct(store: Store) -> None:
    rels = [from_raw(b"wf/" + name) for name in STRANGE_NAMES]
    await add(store, [new_file(rel, size=n + 1) for n, rel in enumerate(rels)])
    known = await store.known_files()
    assert {raw(rel) for rel in known} == {b"wf/" + name for name in STRANGE_NAMES}
    assert all(known[rel].size == n + 1 for n, rel in enumerate(rels))
    ready = await store.ready_calls(now=1.0, limit=100)
    assert [g.batch_key for g in ready] == rels
    files = await store.files_of_calls([g.id for g in ready])
    assert [files[g.id][0].rel for g in ready] == rels


async def test_strange_folder_names_key_their_batches_exactly(store: Store) -> None:
    folders = [from_raw(b"wf/" + name) for name in STRANGE_NAMES]
    await add(store, [f for folder in folders for f in folder_files(folder, 2)])
    calls = await store.collecting_calls()
    assert sorted(raw(g.batch_key) for g in calls) == sorted(raw(f) for f in folders)
    assert all(g.file_count == 2 for g in calls)


async def test_a_strange_name_survives_rejection_errors_and_retry(store: Store) -> None:
    rel = from_raw(b"wf/\xff bad \xc3\xa9")
    await add(store, [new_file(rel, reason="empty file")])
    (rejected,) = await store.rejected_files(limit=10)
    assert rejected.rel == rel
    await store.mark_delivered([Delivery(rejected.id, "error", None)], finished_calls=[], now=2.0)
    (delivered,) = await store.delivered_files(limit=10)
    assert delivered.rel == rel
    await store.mark_done([rejected.id], now=3.0)
    assert await store.recent_errors(limit=10) == [(rel, "empty file", 3.0)]
    assert [f.rel for f in await store.failed_files()] == [rel]


_name_part = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(folder=_name_part, leaves=st.lists(_name_part, min_size=1, max_size=4, unique=True))
async def test_any_name_round_trips_exactly(
    store: Store, folder: bytes, leaves: list[bytes]
) -> None:
    # one store for all examples: each example lives under a folder of its own
    prefix = f"wf/{os.urandom(8).hex()}/{from_raw(folder)}"
    rels = [f"{prefix}/{from_raw(leaf)}" for leaf in leaves]
    await add(store, [new_file(rel, mode="folder") for rel in rels])
    (call,) = [g for g in await store.collecting_calls() if g.batch_key == prefix]
    assert raw(call.batch_key) == raw(prefix)
    stored = (await store.files_of_calls([call.id]))[call.id]
    assert [raw(f.rel) for f in stored] == [raw(rel) for rel in rels]
    known = await store.known_files()
    assert all(rel in known for rel in rels)
    await store.close_batch(call.id)


_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=200)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(reason=_text, status=_text, result=_text)
async def test_any_text_round_trips(store: Store, reason: str, status: str, result: str) -> None:
    call = await to_polling(store, await one_ready(store, f"wf/{os.urandom(8).hex()}"))
    await store.mark_terminal([Finished(call.id, status, result, reason)], now=5.0)
    ended = await store.call(call.id)
    assert (ended.status, ended.result_json, ended.error_reason) == (status, result, reason)


# -- one runner's claims ---------------------------------------------------------------------
# However many runners share a store, one that claims work sees what the lists show, holds what
# it claimed (claiming again hands it back), and may write it; SQLite's only runner holds all.


async def test_claims_hand_out_what_the_lists_show_in_their_order(store: Store) -> None:
    calls = [await one_ready(store, f"wf/{n}.txt") for n in range(4)]
    await store.mark_submit_later([calls[0].id], not_before=2.0)
    assert await store.claim_ready(now=5.0, limit=3) == await store.ready_calls(now=5.0, limit=3)
    assert [g.id for g in await store.claim_ready(now=5.0, limit=10)] == [
        calls[n].id for n in (1, 2, 3, 0)
    ]
    await store.mark_sending([calls[0].id, calls[1].id], now=6.0)
    await store.mark_unknown([calls[1].id, calls[0].id], not_before=7.0)
    assert [g.id for g in await store.claim_due_unknown(now=7.0, limit=10)] == [
        calls[0].id,
        calls[1].id,
    ]
    assert await store.claim_due_unknown(now=6.9, limit=10) == []
    for n, call in enumerate(calls[2:]):
        await store.mark_sending([call.id], now=8.0)
        await store.mark_submitted(
            call.id, call_id=f"c{n}", status=None, now=8.0, next_poll=10.0 - n
        )
    assert [g.id for g in await store.claim_due_polls(now=10.0, limit=10)] == [
        calls[3].id,
        calls[2].id,
    ]
    assert [g.id for g in await store.claim_due_polls(now=9.5, limit=1)] == [calls[3].id]
    await store.mark_terminal([Finished(calls[2].id, "completed", None, None)], now=11.0)
    await store.mark_terminal([Finished(calls[3].id, "completed", None, None)], now=10.5)
    assert [g.id for g in await store.claim_terminal(limit=10)] == [calls[3].id, calls[2].id]


async def test_a_claimed_call_lives_its_whole_life_under_its_claim(store: Store) -> None:
    await one_ready(store, "wf/a.txt")
    (call,) = await store.claim_ready(now=1.0, limit=10)
    assert await store.claim_ready(now=1.0, limit=10) == [call]  # held, and handed back
    await store.mark_sending([call.id], now=2.0)
    assert [(r.calls_held, r.pid) for r in await store.runners()] == [(1, os.getpid())]
    await store.heartbeat()
    await store.mark_submitted(call.id, call_id="c1", status=None, now=3.0, next_poll=4.0)
    (polled,) = await store.claim_due_polls(now=4.0, limit=10)
    await store.record_polls([], [NextPoll(polled.id, 5.0, "running")], now=4.0)
    (polled,) = await store.claim_due_polls(now=5.0, limit=10)
    await store.mark_terminal([Finished(polled.id, "completed", None, None)], now=6.0)
    (ended,) = await store.claim_terminal(limit=10)
    await store.release([ended.id])
    (ended,) = await store.claim_terminal(limit=10)
    await deliver_all(store, ended)
    assert (await store.call(call.id)).state == "done"
    assert await store.expire_runners() == []
    (runner,) = await store.runners()
    assert runner.calls_held == 0
    assert runner.id
    await store.join()  # joining again (after being declared dead) leaves it the one runner
    await store.heartbeat()
    assert [r.id for r in await store.runners()] == [runner.id]


# -- crash between any two writes ------------------------------------------------------------


@dataclass
class Journey:
    """Ids learnt as the journey goes (what a runner would read back from the store)."""

    ids: dict[str, int] = field(default_factory=dict)
    files: dict[str, list[int]] = field(default_factory=dict)


Step = Callable[[Store, Journey], Awaitable[None]]


async def _take(store: Store, j: Journey) -> None:
    await add(
        store,
        [
            new_file("wf/a.txt"),
            *folder_files(from_raw(b"wf/b\xff"), 2),
            new_file("wf/r.txt", reason="empty"),
        ],
    )
    (a,) = await store.ready_calls(now=1.0, limit=10)
    (b,) = await store.collecting_calls()
    j.ids.update(a=a.id, b=b.id)
    by_call = await store.files_of_calls([a.id, b.id])
    j.files.update(a=[f.id for f in by_call[a.id]], b=[f.id for f in by_call[b.id]])
    j.files["r"] = [f.id for f in await store.rejected_files(limit=10)]


async def _close(store: Store, j: Journey) -> None:
    await store.close_batch(j.ids["b"])


async def _send_both(store: Store, j: Journey) -> None:
    await store.mark_sending([j.ids["a"], j.ids["b"]], now=2.0)


async def _a_submitted(store: Store, j: Journey) -> None:
    await store.mark_submitted(j.ids["a"], call_id="ca", status="pending", now=3.0, next_poll=4.0)


async def _b_unknown(store: Store, j: Journey) -> None:
    await store.mark_unknown([j.ids["b"]], not_before=3.0)


async def _b_never_created(store: Store, j: Journey) -> None:
    await store.mark_submit_later([j.ids["b"]], not_before=4.0)


async def _b_sent_again(store: Store, j: Journey) -> None:
    await store.mark_sending([j.ids["b"]], now=4.0)


async def _b_submitted(store: Store, j: Journey) -> None:
    await store.mark_submitted(j.ids["b"], call_id="cb", status="pending", now=5.0, next_poll=6.0)


async def _poll_page(store: Store, j: Journey) -> None:
    await store.record_polls(
        [Finished(j.ids["a"], "completed", '{"outputs": []}', None)],
        [NextPoll(j.ids["b"], 8.0, "running")],
        now=6.0,
    )


async def _deliver_a_and_rejected(store: Store, j: Journey) -> None:
    await store.mark_delivered(
        [Delivery(j.files["a"][0], "result", None), Delivery(j.files["r"][0], "error", None)],
        finished_calls=[j.ids["a"]],
        now=7.0,
    )


async def _archive_a_and_rejected(store: Store, j: Journey) -> None:
    await store.mark_done([j.files["a"][0], j.files["r"][0]], now=7.5)


async def _b_ends(store: Store, j: Journey) -> None:
    await store.mark_terminal([Finished(j.ids["b"], "failed", None, "timed out")], now=9.0)


async def _deliver_b(store: Store, j: Journey) -> None:
    await store.mark_delivered(
        [Delivery(fid, "error", None) for fid in j.files["b"]],
        finished_calls=[j.ids["b"]],
        now=10.0,
    )


async def _archive_b(store: Store, j: Journey) -> None:
    await store.mark_done(j.files["b"], now=11.0)


JOURNEY: list[Step] = [
    _take,
    _close,
    _send_both,
    _a_submitted,
    _b_unknown,
    _b_never_created,
    _b_sent_again,
    _b_submitted,
    _poll_page,
    _deliver_a_and_rejected,
    _archive_a_and_rejected,
    _b_ends,
    _deliver_b,
    _archive_b,
]


async def snapshot(store: Store, j: Journey) -> dict[str, Any]:
    """Everything the stages can read back about the journey's calls and files."""
    call_row_ids = sorted(j.ids.values())
    return {
        "calls": [await store.call(gid) for gid in call_row_ids],
        "files": await store.files_of_calls(call_row_ids),
        "rejected": await store.rejected_files(limit=100),
        "delivered": await store.delivered_files(limit=100),
        "failed": await store.failed_files(),
        "known": await store.known_files(),
        "counts": await store.counts(),
        "unfinished": await store.unfinished_work(),
        "ready": await store.ready_calls(now=100.0, limit=100),
        "unknown": await store.due_unknown(now=100.0, limit=100),
        "polls": await store.due_polls(now=100.0, limit=100),
        "terminal": await store.terminal_calls(limit=100),
    }


def after_recovery(calls: list[CallRow]) -> list[CallRow]:
    """What ``recover`` promises: a POST that may have been in flight is an unknown outcome."""
    return [
        msgspec.structs.replace(g, state="unknown", not_before=0) if g.state == "sending" else g
        for g in calls
    ]


@pytest.mark.parametrize("crash_after", range(1, len(JOURNEY) + 1))
async def test_a_crash_between_any_two_writes_keeps_every_write_before_it(
    store_factory: StoreFactory, crash_after: int
) -> None:
    journey = Journey()
    before: dict[str, Any] = {}
    for step in JOURNEY[:crash_after]:
        async with store_factory.open() as store:  # every write is followed by a "crash"
            await step(store, journey)
            before = await snapshot(store, journey)
    async with store_factory.open() as store:
        await store.recover()
        recovered = await snapshot(store, journey)
        assert recovered["calls"] == after_recovery(before["calls"])
        for key in ("files", "rejected", "delivered", "failed", "known", "terminal", "polls"):
            assert recovered[key] == before[key], key
        assert recovered["unfinished"] == before["unfinished"]
        assert recovered["counts"].files == before["counts"].files
        sending = [g.id for g in before["calls"] if g.state == "sending"]
        assert [g.id for g in recovered["unknown"]] == sorted(
            {g.id for g in before["unknown"]} | set(sending)
        )

        # and the journey goes on to its end from wherever it stopped
        for step in JOURNEY[crash_after:]:
            await step(store, journey)
        assert await store.unfinished_work() == 0
        assert await store.open_call_count() == 0
        assert (await store.counts()).files == {"done:result": 1, "done:error": 3}


async def test_a_reopened_store_sees_everything_committed(store_factory: StoreFactory) -> None:
    journey = Journey()
    async with store_factory.open() as store:
        for step in JOURNEY[:9]:
            await step(store, journey)
        before = await snapshot(store, journey)
    async with store_factory.open() as store:
        assert await snapshot(store, journey) == before


# -- content dedupe --------------------------------------------------------------------------

SAME = "cd" * 32
OTHER = "ef" * 32


def content_file(
    rel: str,
    *,
    sha256: str = SAME,
    workflow: str = "wf",
    input_type: str = "text",
    mode: str = "file",
) -> NewFile:
    key = rel if mode == "file" else rel.rsplit("/", 1)[0]
    item = rel.rsplit("/", 1)[-1]
    return NewFile(
        rel=rel,
        size=4,
        mtime_ns=1,
        sha256=sha256,
        input_type=input_type,
        destination=Destination(workflow, mode, key, item),  # type: ignore[arg-type]
    )


async def ready_with(store: Store, new: NewFile, *, now: float = 1.0) -> CallRow:
    await add(store, [new], now=now)
    (call,) = [g for g in await store.ready_calls(now=1e9, limit=1000) if g.batch_key == new.rel]
    return call


async def completed(
    store: Store, call: CallRow, *, call_id: str = "c1", outcome: str = "result"
) -> None:
    """The call's bem call completed and its documents were written as ``outcome``."""
    await to_polling(store, call, call_id=call_id)
    await store.mark_terminal([Finished(call.id, "completed", '{"outputs": []}', None)], now=5.0)
    await deliver_all(store, call, outcome=outcome)


async def test_a_completed_result_is_reused_by_a_single_file_of_the_same_content(
    store: Store,
) -> None:
    first = await ready_with(store, content_file("wf/a.txt"))
    await completed(store, first, call_id="call-a")
    await store.mark_done([(await the_file(store, first.id)).id], now=7.0)
    source = await the_file(store, first.id)

    second = await ready_with(store, content_file("wf/copy/b.txt"), now=8.0)
    settled = await store.settle_duplicates([second.id], now=9.0)
    assert (settled.reused, settled.waiting) == ([second.id], [])
    reused = await store.call(second.id)
    assert (reused.state, reused.status, reused.call_id, reused.reused_file_id) == (
        "terminal",
        "completed",
        "call-a",
        source.id,
    )
    assert (reused.finished_at, reused.submitted_at, reused.sent_at) == (9.0, None, None)
    assert await store.ready_calls(now=1e9, limit=10) == []
    assert await store.open_call_count() == 0
    assert [g.id for g in await store.terminal_calls(limit=10)] == [second.id]
    sources = await store.reuse_sources([source.id, source.id])
    assert list(sources) == [source.id]
    call, files = sources[source.id]
    assert (call, [f.id for f in files]) == (await store.call(first.id), [source.id])

    await deliver_all(store, reused)
    counts = await store.counts()
    assert counts.reused == 1
    assert counts.calls == {"done": 1}  # a reuse is no call
    assert counts.files == {"done:result": 1, "delivered:result": 1}
    assert (await store.call(second.id)).state == "done"


async def test_a_result_is_reused_only_for_the_same_content_workflow_and_input_type(
    store: Store,
) -> None:
    first = await ready_with(store, content_file("wf/a.txt"))
    await completed(store, first)
    others = [
        await ready_with(store, content_file("wf/b.txt", sha256=OTHER)),
        await ready_with(store, content_file("other/c.txt", workflow="other")),
        await ready_with(store, content_file("wf/d.csv", input_type="csv")),
    ]
    settled = await store.settle_duplicates([g.id for g in others], now=9.0)
    assert (settled.reused, settled.waiting) == ([], [])
    assert [g.state for g in [await store.call(g.id) for g in others]] == ["ready"] * 3


async def test_a_failed_result_is_never_reused(store: Store) -> None:
    errored = await ready_with(store, content_file("wf/a.txt"))
    await completed(store, errored, outcome="error")  # completed, but no result for the file
    failed = await ready_with(store, content_file("wf/b.txt"))
    await to_polling(store, failed, call_id="c2")
    await store.mark_terminal([Finished(failed.id, "failed", None, "bem failed it")], now=5.0)
    await deliver_all(store, failed, outcome="error")
    third = await ready_with(store, content_file("wf/c.txt"))
    settled = await store.settle_duplicates([third.id], now=9.0)
    assert (settled.reused, settled.waiting) == ([], [])
    assert (await store.call(third.id)).state == "ready"


async def test_a_reused_result_is_not_a_source_itself(store: Store) -> None:
    first = await ready_with(store, content_file("wf/a.txt"))
    await completed(store, first, call_id="call-a")
    source = await the_file(store, first.id)
    second = await ready_with(store, content_file("wf/b.txt"))
    await store.settle_duplicates([second.id], now=9.0)
    await deliver_all(store, await store.call(second.id))
    third = await ready_with(store, content_file("wf/c.txt"))
    assert (await store.settle_duplicates([third.id], now=10.0)).reused == [third.id]
    assert (await store.call(third.id)).reused_file_id == source.id  # the original, always


async def test_same_content_in_flight_waits_and_is_woken_by_its_delivery(store: Store) -> None:
    first = await ready_with(store, content_file("wf/a.txt"))
    await to_polling(store, first, call_id="call-a")
    second = await ready_with(store, content_file("wf/b.txt"))
    settled = await store.settle_duplicates([second.id], now=4.0)
    assert (settled.reused, settled.waiting) == ([], [second.id])
    assert (await store.call(second.id)).state == "waiting"
    assert await store.ready_calls(now=1e9, limit=10) == []
    assert await store.next_submit_due() is None
    assert await store.unfinished_work() == 4  # two calls, two queued files
    assert (await store.counts()).calls == {"polling": 1, "waiting": 1}
    # deciding again changes nothing: it is not ready
    assert await store.settle_duplicates([second.id], now=4.5) == Settled([], [])

    await store.mark_terminal([Finished(first.id, "completed", '{"outputs": []}', None)], now=5.0)
    assert (await store.call(second.id)).state == "waiting"  # no document yet
    await deliver_all(store, first)
    woken = await store.call(second.id)
    assert (woken.state, woken.not_before) == ("ready", 0)
    assert (await store.settle_duplicates([second.id], now=7.0)).reused == [second.id]


async def test_waiters_for_a_failed_file_wake_and_the_oldest_is_sent(store: Store) -> None:
    first = await ready_with(store, content_file("wf/a.txt"))
    await to_polling(store, first)
    waiters = [await ready_with(store, content_file(f"wf/w{n}.txt")) for n in range(3)]
    settled = await store.settle_duplicates([g.id for g in reversed(waiters)], now=4.0)
    assert sorted(settled.waiting) == [g.id for g in waiters]
    await store.mark_terminal([Finished(first.id, "failed", None, "bem failed it")], now=5.0)
    await deliver_all(store, first, outcome="error")
    assert [g.id for g in await store.ready_calls(now=6.0, limit=10)] == [g.id for g in waiters]
    settled = await store.settle_duplicates([g.id for g in waiters], now=6.0)
    assert (settled.reused, settled.waiting) == ([], [g.id for g in waiters[1:]])
    assert [g.id for g in await store.ready_calls(now=6.0, limit=10)] == [waiters[0].id]


async def test_of_ready_files_of_one_content_only_the_oldest_goes(store: Store) -> None:
    calls = [await ready_with(store, content_file(f"wf/{n}.txt")) for n in range(3)]
    # asked for the younger ones only, they still wait for the oldest
    assert (await store.settle_duplicates([calls[2].id], now=2.0)).waiting == [calls[2].id]
    settled = await store.settle_duplicates([g.id for g in calls], now=2.0)
    assert (settled.reused, settled.waiting) == ([], [calls[1].id])
    assert [g.id for g in await store.ready_calls(now=2.0, limit=10)] == [calls[0].id]


async def test_a_batch_is_never_shortened_but_its_results_are_reused(store: Store) -> None:
    await add(
        store,
        [
            content_file("wf/f/1.txt", mode="folder", sha256=OTHER),
            content_file("wf/f/2.txt", mode="folder"),
        ],
    )
    (folder,) = await store.collecting_calls()
    single = await ready_with(store, content_file("wf/alone.txt"))
    # the open folder holds the same content: the single file waits for it
    assert (await store.settle_duplicates([single.id], now=2.0)).waiting == [single.id]
    await store.close_batch(folder.id)
    assert await store.settle_duplicates([folder.id], now=2.0) == Settled([], [])
    assert (await store.call(folder.id)).state == "ready"
    # ready, the batch goes first though it is younger: a batch never waits
    await store.recover()
    assert (await store.settle_duplicates([single.id], now=2.0)).waiting == [single.id]
    await completed(store, await store.call(folder.id), call_id="batch")
    (item,) = [f for f in (await store.files_of_calls([folder.id]))[folder.id] if f.sha256 == SAME]
    assert (await store.settle_duplicates([single.id], now=7.0)).reused == [single.id]
    assert (await store.call(single.id)).reused_file_id == item.id
    call, files = (await store.reuse_sources([item.id]))[item.id]
    assert (call.id, call.batch, len(files)) == (folder.id, True, 2)


async def test_a_superseded_leader_wakes_its_waiters(store: Store) -> None:
    leader = await ready_with(store, content_file("wf/a.txt"))
    waiter = await ready_with(store, content_file("wf/b.txt"))
    assert (await store.settle_duplicates([waiter.id], now=2.0)).waiting == [waiter.id]
    await store.supersede_file(await the_file(store, leader.id))
    assert (await store.call(waiter.id)).state == "ready"


async def test_recover_wakes_every_waiting_call(store_factory: StoreFactory) -> None:
    async with store_factory.open() as store:
        leader = await ready_with(store, content_file("wf/a.txt"))
        await to_polling(store, leader)
        waiter = await ready_with(store, content_file("wf/b.txt"))
        await store.settle_duplicates([waiter.id], now=4.0)
    async with store_factory.open() as store:
        assert (await store.call(waiter.id)).state == "waiting"  # kept across a restart
        await store.recover()
        assert (await store.call(waiter.id)).state == "ready"
        # and deciding again, it waits again: its leader is still out
        assert (await store.settle_duplicates([waiter.id], now=5.0)).waiting == [waiter.id]


async def test_a_reuse_decided_before_a_crash_is_kept_and_costs_no_call(
    store_factory: StoreFactory,
) -> None:
    async with store_factory.open() as store:
        first = await ready_with(store, content_file("wf/a.txt"))
        await completed(store, first)
        second = await ready_with(store, content_file("wf/b.txt"))
        await store.settle_duplicates([second.id], now=9.0)
    async with store_factory.open() as store:  # crashed before its document was written
        await store.recover()
        assert await store.ready_calls(now=1e9, limit=10) == []
        assert await store.due_unknown(now=1e9, limit=10) == []
        source = await the_file(store, first.id)
        (terminal,) = await store.terminal_calls(limit=10)
        assert (terminal.id, terminal.reused_file_id) == (second.id, source.id)
        assert await store.settle_duplicates([second.id], now=10.0) == Settled([], [])


# -- many tasks at once ----------------------------------------------------------------------

CONCURRENT_TASKS = 8
ROUNDS_PER_TASK = 30


async def test_many_tasks_writing_and_reading_at_once_each_read_back_what_they_wrote(
    store: Store,
) -> None:
    # The stages share one store: the same statements run for several tasks at once, and
    # reads run while another task's write is in its transaction.
    calls = [
        await to_polling(store, await one_ready(store, f"wf/{n}.txt"), call_id=f"c{n}")
        for n in range(CONCURRENT_TASKS)
    ]

    async def write_and_read(call: CallRow) -> None:
        for step in range(ROUNDS_PER_TASK):
            due = 100.0 + step
            await store.reschedule_polls([NextPoll(call.id, due, "running")])
            assert (await store.call(call.id)).not_before == due
            assert (await store.counts()).calls.get("polling") == CONCURRENT_TASKS
            await store.add_files([new_file(f"wf/{call.id}-{step}.txt")], now=2.0, batch_limits={})

    async with anyio.create_task_group() as tasks:
        for call in calls:
            tasks.start_soon(write_and_read, call)
    files = await store.files_of_calls([g.id for g in await store.ready_calls(now=1e9, limit=1000)])
    assert sum(len(f) for f in files.values()) == CONCURRENT_TASKS * ROUNDS_PER_TASK


async def test_answers_recorded_at_once_are_each_written_before_their_caller_goes_on(
    store: Store,
) -> None:
    # each POST's answer is recorded by its own task, and a store may commit them together
    calls = [await one_ready(store, f"wf/{n}.txt") for n in range(20)]
    await store.mark_sending([g.id for g in calls], now=2.0)

    async def record(call: CallRow) -> None:
        await store.mark_submitted(
            call.id, call_id=f"c{call.id}", status="pending", now=3.0, next_poll=4.0
        )
        recorded = await store.call(call.id)
        assert (recorded.state, recorded.call_id) == ("polling", f"c{call.id}")

    async with anyio.create_task_group() as tasks:
        for call in calls:
            tasks.start_soon(record, call)
    assert (await store.counts()).calls == {"polling": 20}


# -- the rate budget -------------------------------------------------------------------------


async def test_a_take_from_the_budget_says_when_to_ask_again_if_it_fell_short(
    store: Store,
) -> None:
    for _ in range(3):
        tokens = await store.take_tokens(4, rate=1000.0, burst=10)
        assert 0 <= tokens.granted <= 4
        assert (tokens.wait_seconds > 0) == (tokens.granted < 4)
    await store.pause_sending(0.0)


async def test_wake_ups_open_and_close_around_writes(store: Store) -> None:
    async with store.wake_ups():
        await one_ready(store, "wf/a.txt")
    async with store.wake_ups():
        pass
    assert len(await store.ready_calls(now=1.0, limit=10)) == 1
