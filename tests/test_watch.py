from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
import watchfiles.main
from hypothesis import given
from hypothesis import strategies as st
from watchfiles._rust_notify import RustNotify

from runner.errors import StoreUnavailableError
from runner.scan import Entry, Settler, examine, hash_file, is_new, scan_inbox, scan_paths
from runner.sharing import keep_running
from runner.store.base import KnownFile
from runner.watch import Watcher, watchfiles_events

from .conftest import fast_emulator, frozen_emulator
from .fake_time import UNTIL_REAL_SECONDS
from .pipeline import make_config, running
from .stages import stage_world


def touch(path: Path, content: bytes = b"x", mtime: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_scan_skips_hidden_partial_symlinks_and_special_files(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    outside = tmp_path / "secret.txt"
    touch(outside, b"do not send")
    touch(inbox / "wf/a.txt")
    touch(inbox / "wf/batch/b.pdf")
    touch(inbox / "wf/.hidden.txt")
    touch(inbox / "wf/.git/config")
    touch(inbox / "wf/c.txt.part")
    touch(inbox / "wf/d.TMP")
    touch(inbox / "wf/e.pdf.crdownload")
    (inbox / "wf/link.txt").symlink_to(outside)
    (inbox / "wf/linkdir").symlink_to(tmp_path)
    os.mkfifo(inbox / "wf/pipe.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "wf/sock.txt"))
    try:
        report = scan_inbox(inbox)
    finally:
        sock.close()

    assert sorted(e.rel for e in report.entries) == ["wf/a.txt", "wf/batch/b.pdf"]
    assert dict(report.skipped) == {
        "wf/link.txt": "symlink (never followed)",
        "wf/linkdir": "symlink (never followed)",
        "wf/pipe.txt": "not a regular file",
        "wf/sock.txt": "not a regular file",
    }


def test_hash_file_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        hash_file(fifo)


def test_old_files_settle_at_first_sight_new_ones_after_the_settle_time() -> None:
    settler = Settler(settle_seconds=2.0)
    old = Entry("wf/old.txt", 5, int(90e9))
    fresh = Entry("wf/new.txt", 5, int(99.5e9))
    assert settler.observe([old, fresh], now=100.0, complete=True) == [old]
    assert settler.next_deadline() == 102.0
    assert settler.observe([fresh], now=101.0, complete=True) == []
    assert settler.observe([fresh], now=102.0, complete=True) == [fresh]
    assert not settler.pending


def test_a_file_that_keeps_changing_never_settles() -> None:
    settler = Settler(settle_seconds=2.0)
    for second in range(10):
        now = 100.0 + second
        growing = Entry("wf/log.txt", 10 * second + 1, int(now * 1e9))
        assert settler.observe([growing], now=now, complete=True) == []
    assert settler.has_pending_under("wf")
    assert not settler.has_pending_under("w")


def test_a_pending_file_that_vanished_is_forgotten_by_a_full_scan() -> None:
    settler = Settler(settle_seconds=2.0)
    settler.observe([Entry("wf/a.txt", 1, int(100e9))], now=100.0, complete=True)
    settler.observe([], now=100.5, complete=False)
    assert "wf/a.txt" in settler.pending
    settler.observe([], now=101.0, complete=True)
    assert not settler.pending


@given(
    state=st.sampled_from(["queued", "rejected", "delivered", "done", "retried", None]),
    same=st.booleans(),
    keep=st.booleans(),
)
def test_is_new(state: str | None, same: bool, keep: bool) -> None:
    entry = Entry("wf/a.txt", 10, 1000)
    known = {} if state is None else {"wf/a.txt": KnownFile(10 if same else 11, 1000, state)}
    expected = state in (None, "retried") or (state == "done" and (not keep or not same))
    assert is_new(entry, known, keep=keep) is expected


def test_examine_rejects_with_reasons(tmp_path: Path) -> None:
    inbox = tmp_path
    touch(inbox / "wf/ok.txt", b"hello")
    touch(inbox / "wf/empty.txt", b"")
    touch(inbox / "wf/big.txt", b"x" * 11)
    touch(inbox / "wf/tool.exe", b"MZ")

    def check(rel: str) -> str | None:
        st_ = (inbox / rel).stat()
        new = examine(inbox, Entry(rel, st_.st_size, st_.st_mtime_ns), routes=(), max_file_bytes=10)
        assert new is not None
        return new.reason

    assert check("wf/ok.txt") is None
    assert check("wf/empty.txt") == "empty file: nothing to send"
    assert "too large" in (check("wf/big.txt") or "")
    assert "unsupported file type '.exe'" in (check("wf/tool.exe") or "")
    assert examine(inbox, Entry("wf/gone.txt", 5, 1), routes=(), max_file_bytes=10) is None


def test_a_partial_scan_names_each_file_once(tmp_path: Path) -> None:
    touch(tmp_path / "wf/new-folder/a.txt")
    report = scan_paths(tmp_path, ["wf/new-folder", "wf/new-folder/a.txt", "wf"])
    assert [e.rel for e in report.entries] == ["wf/new-folder/a.txt"]


async def keep_touching(path: Path, seen: anyio.Event) -> None:
    """Events exist only while watching: touch ``path`` until an event for it is seen."""
    while not seen.is_set():
        await anyio.Path(path).write_bytes(b"touched")
        with anyio.move_on_after(0.1):
            await seen.wait()


@pytest.mark.anyio
async def test_file_events_survive_a_name_watchfiles_cannot_decode(tmp_path: Path) -> None:
    """watchfiles stops on a name that is not UTF-8; the events say "rescan" and go on."""
    (tmp_path / "wf").mkdir()
    bad = Path(os.fsdecode(os.fsencode(tmp_path / "wf") + b"/\xff\xfebad.txt"))
    stop = anyio.Event()
    watching, rescan, after = anyio.Event(), anyio.Event(), anyio.Event()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_touching, tmp_path / "wf" / "sentinel.txt", watching)
            async for paths in watchfiles_events(tmp_path, stop):
                if not watching.is_set():
                    watching.set()
                    await anyio.Path(bad).write_bytes(b"x")
                elif str(tmp_path) in paths and not rescan.is_set():
                    rescan.set()  # events were lost: the inbox is to be rescanned
                    tg.start_soon(keep_touching, tmp_path / "wf" / "good.txt", after)
                elif rescan.is_set() and any(p.endswith("good.txt") for p in paths):
                    after.set()  # and events flow again
                    stop.set()
    assert rescan.is_set()
    assert after.is_set()


# -- stopping the file events ----------------------------------------------------------------
# watchfiles waits for events in a worker thread that no cancellation reaches: only the stop
# event it was given ends a wait early. Each wait below ends on that event or, as a hang guard
# only, after a minute; a wait the stop event did not end fails the test.


class WaitingSource:
    """An event source that, like watchfiles, waits in a worker thread until its stop event
    is set, looking at it every few milliseconds; it yields nothing."""

    def __init__(self) -> None:
        self.waiting = anyio.Event()
        self.ended: list[str] = []
        """How each wait ended: "stop" (the event was set) or "timeout" (the hang guard)."""
        self._never = threading.Event()
        """Waited on between looks at the stop event: a thread in ``.wait(`` waits for work to
        the time machine (tests/fake_time.py), so the fake clock moves meanwhile; a bare
        ``time.sleep`` would look like work and hold it still (a daemon then never sees its
        supervisor's next turn)."""

    async def __call__(self, inbox: Path, stop: anyio.Event) -> AsyncIterator[set[str]]:
        await anyio.to_thread.run_sync(self._wait, stop)
        return
        yield set()  # an async generator, as a source is; it ends without events

    def _wait(self, stop: anyio.Event) -> None:
        anyio.from_thread.run_sync(self.waiting.set)
        guard = time.monotonic() + UNTIL_REAL_SECONDS
        while not stop.is_set() and time.monotonic() < guard:
            self._never.wait(0.005)
        self.ended.append("stop" if stop.is_set() else "timeout")


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["stopped", "cancelled", "store unreachable"])
async def test_a_wait_for_file_events_ends_when_the_watcher_stops_however_it_stops(
    tmp_path: Path, how: Literal["stopped", "cancelled", "store unreachable"]
) -> None:
    """The runner stops it, a task group around it is cancelled, or it fails on the store."""
    source = WaitingSource()
    async with stage_world(tmp_path, frozen_emulator()) as world:
        watcher = Watcher(world.ctx, events=source)
        async with anyio.create_task_group() as tg:
            if how == "store unreachable":

                async def take_unreachable(*, full: bool) -> int:
                    await source.waiting.wait()
                    raise StoreUnavailableError("the connection was refused")

                watcher.take = take_unreachable  # type: ignore[method-assign]
                # the watcher stops on the error, to be started again after a pause
                tg.start_soon(keep_running, world.ctx, watcher.run)
                await world.clock.wait_for_sleepers(1)  # the pause: the watcher has stopped
                world.ctx.stop()
            else:
                tg.start_soon(watcher.run)
                await source.waiting.wait()
                if how == "stopped":
                    world.ctx.stop()
                else:
                    tg.cancel_scope.cancel()
    assert source.ended == ["stop"]


@pytest.mark.anyio
async def test_a_wait_for_file_events_ends_when_the_daemon_stops(tmp_path: Path) -> None:
    source = WaitingSource()
    config = make_config(tmp_path)
    async with running(config, fast_emulator(), events=source):
        await source.waiting.wait()
    assert source.ended == ["stop"]


@pytest.mark.anyio
async def test_stopping_the_watcher_ends_the_wait_of_watchfiles_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real file events on a real folder. Each wait here lasts up to a minute, not 5 s:
    only the stop event can end it."""
    waiting = anyio.Event()
    ended: list[object] = []

    class LongWaits:
        def __init__(self, *args: Any) -> None:
            self._notify = RustNotify(*args)

        def __enter__(self) -> LongWaits:
            return self

        def __exit__(self, *exc: object) -> None:
            self._notify.close()

        def watch(self, debounce_ms: int, step_ms: int, timeout_ms: int, stop: Any) -> object:
            anyio.from_thread.run_sync(waiting.set)
            outcome = self._notify.watch(debounce_ms, step_ms, int(UNTIL_REAL_SECONDS * 1000), stop)
            ended.append(outcome)
            return outcome

    monkeypatch.setattr(watchfiles.main, "RustNotify", LongWaits)
    async with stage_world(tmp_path, frozen_emulator()) as world:
        watcher = Watcher(world.ctx, events=watchfiles_events)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            await waiting.wait()
            world.ctx.stop()
    assert ended == ["stop"]
