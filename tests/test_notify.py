"""sd_notify over a real unix datagram socket: readiness, status, watchdog, stop, reload."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from runner.daemon import Outcome, Runner, RunnerOptions
from runner.emulator import Emulator, EmulatorSettings
from runner.notify import Notifier, NotifySettings, notify_settings, status_line
from runner.store.base import Counts
from tests.notify_socket import notify_listener
from tests.pipeline import make_config, write_files

WATCHDOG_USEC = 40_000  # pings every 20 ms


def test_settings_come_from_the_environment() -> None:
    environ = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}
    assert notify_settings(environ, pid=42) == NotifySettings("@sd", 30_000_000)
    assert notify_settings(environ, pid=42).watchdog_every == 15.0
    # The watchdog belongs to another process: no pings from this one.
    assert notify_settings(environ, pid=7) == NotifySettings("@sd", None)
    assert notify_settings({"WATCHDOG_USEC": "nonsense"}, pid=1) == NotifySettings()


def test_without_a_socket_nothing_is_sent() -> None:
    with Notifier(NotifySettings(watchdog_usec=WATCHDOG_USEC)) as notifier:
        assert not notifier.enabled
        notifier.ready("x")
        assert notifier.watchdog(100.0) is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_messages_reach_the_socket(abstract: bool) -> None:
    with notify_listener(abstract=abstract) as listener:
        settings = NotifySettings(listener.address, WATCHDOG_USEC)
        with Notifier(settings) as notifier:
            notifier.ready("running: 0 queued")
            notifier.status("running: 0 queued")  # unchanged: not sent again
            notifier.status("running: 1 queued")
            assert notifier.watchdog(10.0)
            assert not notifier.watchdog(10.01)  # within half the interval
            assert notifier.watchdog(10.05)
            notifier.reloading()
            notifier.stopping(status="stopping", needs=40)
            notifier.extend_timeout(12.5)
        messages = listener.pending()
    assert messages[0] == {"READY": "1", "STATUS": "running: 0 queued"}
    assert messages[1] == {"STATUS": "running: 1 queued"}
    assert messages[2] == messages[3] == {"WATCHDOG": "1"}
    assert messages[4]["RELOADING"] == "1"
    assert int(messages[4]["MONOTONIC_USEC"]) > 0
    assert messages[5] == {"STOPPING": "1", "STATUS": "stopping", "EXTEND_TIMEOUT_USEC": "40000000"}
    assert messages[6] == {"EXTEND_TIMEOUT_USEC": "12500000"}
    assert len(messages) == 7


def test_status_line_counts() -> None:
    files = {"queued": 3, "done:result": 5, "delivered:error": 1, "done:error": 1}
    assert status_line(files, 2, mode="running") == (
        "running: 3 queued, 2 calls open, 5 results, 2 errors"
    )


@pytest.mark.anyio
async def test_watchdog_pings_stop_while_the_loop_is_wedged(tmp_path: Path) -> None:
    emulator = Emulator(EmulatorSettings(latency_min=0, latency_max=0))
    config = make_config(tmp_path)
    write_files(config.paths.inbox, [("wf/a.txt", b"hello")])
    wedge, wedged, release = anyio.Event(), anyio.Event(), anyio.Event()

    async def progress(counts: Counts) -> None:
        if wedge.is_set() and not release.is_set():
            wedged.set()
            await release.wait()  # the supervisor's loop hangs here

    outcome: list[Outcome] = []
    with (
        notify_listener() as listener,
        Notifier(NotifySettings(listener.address, WATCHDOG_USEC)) as notifier,
    ):
        runner = Runner(
            config,
            RunnerOptions(drain=False, handle_signals=False, supervise_every=5.0),
            transport=httpx.ASGITransport(app=emulator.app),
            events=None,
            progress=progress,
            notifier=notifier,
        )

        async def serve() -> None:
            outcome.append(await runner.serve())

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            first = await listener.receive()
            assert first["READY"] == "1"
            assert first["STATUS"].startswith("running: ")
            await listener.until("WATCHDOG")
            await listener.until("WATCHDOG")

            wedge.set()
            await wedged.wait()
            listener.pending()  # pings from before the loop hung
            await anyio.sleep(10 * WATCHDOG_USEC / 1e6)
            assert [m for m in listener.pending() if "WATCHDOG" in m] == []

            release.set()
            await listener.until("WATCHDOG")
            runner.should_exit = True
            stopping = await listener.until("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert outcome[0].exit_code == 0
    assert all("READY" not in m for m in listener.seen[1:])
