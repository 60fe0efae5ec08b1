from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from runner.errors import StoreError
from runner.route import Destination
from runner.store.base import Delivery, Finished, NewFile, NextPoll
from runner.store.sqlite import SCHEMA_VERSION, open_sqlite_store

pytestmark = pytest.mark.anyio


def new_file(
    rel: str,
    *,
    mode: str = "file",
    key: str | None = None,
    size: int = 10,
    reason: str | None = None,
) -> NewFile:
    workflow = rel.split("/")[0]
    return NewFile(
        rel=rel,
        size=size,
        mtime_ns=1,
        sha256="ab" * 32,
        input_type="text",
        destination=Destination(workflow, mode, key or rel, rel.rsplit("/", 1)[-1]),  # type: ignore[arg-type]
        reason=reason,
    )


async def test_new_database_is_wal_full_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with open_sqlite_store(path):
        pass
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    # reopening migrates nothing and keeps the data
    async with open_sqlite_store(path) as store:
        assert await store.integrity_check() == "ok"


async def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a bem-runner state database"):
        async with open_sqlite_store(path):
            pass


async def test_someone_elses_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="unknown tables"):
        async with open_sqlite_store(path):
            pass


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with open_sqlite_store(path):
        pass
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        async with open_sqlite_store(path):
            pass


async def test_file_mode_calls_are_born_ready_with_a_reference(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.add_files(
            [new_file("wf/a.txt"), new_file("wf/b.txt")], now=100.0, batch_limits={}
        )
        ready = await store.ready_calls(now=100.0, limit=10)
        assert [g.batch_key for g in ready] == ["wf/a.txt", "wf/b.txt"]
        assert all(g.call_reference_id.startswith("bemr-") for g in ready)
        assert len({g.call_reference_id for g in ready}) == 2
        assert [g.file_count for g in ready] == [1, 1]


async def test_folder_files_share_one_collecting_call_until_closed(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        files = [new_file(f"wf/f1/{n}.txt", mode="folder", key="wf/f1") for n in range(3)]
        await store.add_files(files, now=1.0, batch_limits={})
        (call,) = await store.collecting_calls()
        assert call.file_count == 3
        assert call.byte_count == 30
        await store.close_batch(call.id)
        assert await store.collecting_calls() == []
        # a file arriving after the close starts a new batch for the same folder
        await store.add_files(
            [new_file("wf/f1/late.txt", mode="folder", key="wf/f1")], now=2.0, batch_limits={}
        )
        (later,) = await store.collecting_calls()
        assert later.id != call.id


async def test_window_groups_close_when_the_next_file_would_overflow(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        limits = {"window:0": (2, 25)}
        files = [new_file(f"wf/{n}.txt", mode="window", key="window:0") for n in range(5)]
        await store.add_files(files, now=1.0, batch_limits=limits)
        ready = await store.ready_calls(now=1.0, limit=10)
        (still_open,) = await store.collecting_calls()
        assert [g.file_count for g in ready] == [2, 2]
        assert still_open.file_count == 1
        # byte limit: 10 + 10 fits in 25, a third 10 would not
        assert all(g.byte_count <= 25 for g in ready)


async def test_rejected_files_are_kept_for_an_error_document(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.add_files(
            [new_file("wf/empty.txt", reason="empty file")], now=1.0, batch_limits={}
        )
        (rejected,) = await store.rejected_files(limit=10)
        assert rejected.reason == "empty file"
        assert rejected.call_row_id is None
        assert await store.ready_calls(now=1.0, limit=10) == []


async def test_a_path_has_at_most_one_unfinished_row(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.add_files([new_file("wf/a.txt")], now=1.0, batch_limits={})
        with pytest.raises(StoreError):
            await store.add_files([new_file("wf/a.txt")], now=2.0, batch_limits={})
        # the failed transaction left nothing behind
        assert len(await store.ready_calls(now=2.0, limit=10)) == 1


async def test_sending_becomes_unknown_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.add_files([new_file("wf/a.txt")], now=1.0, batch_limits={})
        (call,) = await store.ready_calls(now=1.0, limit=10)
        await store.mark_sending([call.id], now=2.0)
    async with open_sqlite_store(path) as store:
        await store.recover()
        (unknown,) = await store.due_unknown(now=3.0, limit=10)
        assert unknown.call_reference_id == call.call_reference_id
        assert unknown.sent_at == 2.0
        assert await store.open_call_count() == 1


async def test_full_life_of_a_call(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.add_files([new_file("wf/a.txt")], now=1.0, batch_limits={})
        (call,) = await store.ready_calls(now=1.0, limit=10)
        await store.mark_sending([call.id], now=2.0)
        await store.mark_submitted(call.id, call_id="c1", status="pending", now=3.0, next_poll=4.0)
        assert await store.due_polls(now=3.5, limit=10) == []
        (due,) = await store.due_polls(now=4.0, limit=10)
        await store.reschedule_polls([NextPoll(due.id, 10.0, "running")])
        assert (await store.call(call.id)).attempts == 1
        await store.mark_terminal([Finished(call.id, "completed", "{}", None)], now=11.0)
        (terminal,) = await store.terminal_calls(limit=10)
        files = await store.files_of_calls([terminal.id])
        (file,) = files[terminal.id]
        await store.mark_delivered([], finished_calls=[call.id], now=11.5)
        assert (await store.call(call.id)).state == "terminal"  # its file is not delivered yet
        await store.mark_delivered(
            [Delivery(file.id, "result", None)], finished_calls=[call.id], now=12.0
        )
        await store.mark_done([file.id], now=13.0)
        assert (await store.call(call.id)).state == "done"
        assert await store.unfinished_work() == 0
        counts = await store.counts()
        assert counts.files == {"done:result": 1}
        known = await store.known_files()
        assert known["wf/a.txt"].state == "done"


async def test_one_poll_page_is_one_transaction(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.add_files(
            [new_file("wf/a.txt"), new_file("wf/b.txt")], now=1.0, batch_limits={}
        )
        a, b = await store.ready_calls(now=1.0, limit=10)
        await store.mark_sending([a.id, b.id], now=2.0)
        for call, call_id in ((a, "ca"), (b, "cb")):
            await store.mark_submitted(
                call.id, call_id=call_id, status="pending", now=3.0, next_poll=4.0
            )
        await store.record_polls(
            [Finished(a.id, "failed", None, "timed out")],
            [NextPoll(b.id, 9.0, "running")],
            now=5.0,
        )
        ended, followed = await store.call(a.id), await store.call(b.id)
        assert (ended.state, ended.error_reason) == ("terminal", "timed out")
        assert ended.finished_at == 5.0
        assert (followed.state, followed.not_before, followed.status) == ("polling", 9.0, "running")
        files = await store.files_of_calls([a.id, b.id])
        assert [f.rel for f in files[a.id]] == ["wf/a.txt"]
        assert [f.rel for f in files[b.id]] == ["wf/b.txt"]


async def test_answers_written_together_all_fail_when_their_transaction_fails(
    tmp_path: Path,
) -> None:
    # answers recorded at once share a transaction: when it fails, no caller is told otherwise
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.add_files([new_file(f"wf/{n}.txt") for n in range(5)], now=1.0, batch_limits={})
        calls = await store.ready_calls(now=1.0, limit=10)
        await store.mark_sending([g.id for g in calls], now=2.0)
        await store._db.execute("PRAGMA query_only = ON")  # every write now fails
        failed: list[int] = []

        async def record(call_row_id: int) -> None:
            with pytest.raises(StoreError, match="readonly"):
                await store.mark_submitted(
                    call_row_id, call_id=f"c{call_row_id}", status="pending", now=3.0, next_poll=4.0
                )
            failed.append(call_row_id)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                for call in calls:
                    tasks.start_soon(record, call.id)
        await store._db.execute("PRAGMA query_only = OFF")
        assert sorted(failed) == sorted(g.id for g in calls)
        assert {(await store.call(g.id)).state for g in calls} == {"sending"}
