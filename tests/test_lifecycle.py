"""The daemon's life as systemd sees it: a real ``python -m runner run`` process, real signals,
a real notify socket, and an emulator served by the test whose slow answers wait for the test."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from runner.emulator import Emulator, EmulatorSettings, serve_emulator
from tests.notify_socket import NotifyListener, notify_listener
from tests.pipeline import API_KEY, outbox_documents

pytestmark = pytest.mark.anyio

CONFIG = """
[paths]
inbox = "{root}/inbox"
outbox = "{root}/outbox"
archive = "{root}/archive"
state = "{root}/state.db"

[api]
visibility_window = "1s"

[inbox]
settle_seconds = 0
on_done = "keep"
rescan_seconds = 0.2

[poll]
initial_seconds = 0.05
max_seconds = 0.2

[limits]
requests_per_second = {rps}
"""

ROUTE = """
[[route]]
glob = "new/**"
workflow = "routed-wf"
"""


def write_config(root: Path, *, rps: float, extra: str = "") -> Path:
    path = root / "bem-runner.toml"
    path.write_text(CONFIG.format(root=root, rps=rps) + extra)
    return path


def put(root: Path, rel: str, content: bytes = b"hello") -> None:
    path = root / "inbox" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def emulator_with(**settings: Any) -> Emulator:
    """Calls finish at once; slow requests wait until the test advances emulator time."""
    return Emulator(EmulatorSettings(latency_min=0, latency_max=0, **settings))


@asynccontextmanager
async def daemon(
    root: Path, base_url: str, listener: NotifyListener, *command: str
) -> AsyncIterator[Process]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEM_", "NOTIFY_"))}
    env.update(BEM_API_KEY=API_KEY, BEM_BASE_URL=base_url, NOTIFY_SOCKET=listener.address)
    args = [sys.executable, "-m", "runner", "--config", str(root / "bem-runner.toml"), *command]
    async with await anyio.open_process(args, env=env) as process:
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()


async def finish(process: Process) -> tuple[int, list[dict[str, Any]]]:
    """Wait for the exit; the log lines it wrote (JSON: stderr is not a terminal)."""
    assert process.stderr is not None
    raw = b""
    async for chunk in process.stderr:
        raw += chunk
    code = await process.wait()
    lines = [json.loads(line) for line in raw.decode().splitlines() if line.startswith("{")]
    return code, lines


def call_states(root: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(root / "state.db") as db:
        return list(db.execute("SELECT state, call_id FROM calls ORDER BY id"))


async def test_sigterm_lets_the_request_in_flight_finish_and_exits_zero(tmp_path: Path) -> None:
    write_config(tmp_path, rps=20)
    put(tmp_path, "wf/a.txt")
    emulator = emulator_with(slow_rate=1.0, slow_seconds=10_000)
    with notify_listener() as listener, anyio.fail_after(60):
        async with (
            serve_emulator(emulator) as base_url,
            daemon(tmp_path, base_url, listener, "run") as process,
        ):
            assert "READY" in await listener.receive()
            await emulator.wait_blocked(1)  # the POST is at bem, unanswered
            process.send_signal(signal.SIGTERM)
            await listener.until("STOPPING", "1")
            emulator.advance(10_000)  # bem answers the POST while the runner is stopping
            code, logs = await finish(process)
    assert code == 0
    [(state, call_id)] = call_states(tmp_path)
    assert state == "polling"  # the answer was kept: the call is known, not "unknown"
    assert call_id is not None
    stopped = [line for line in logs if line["event"] == "runner stopped"]
    assert stopped[0]["exit_code"] == 0


async def test_sighup_reloads_limits_and_routes_without_dropping_work(tmp_path: Path) -> None:
    config = write_config(tmp_path, rps=5)
    put(tmp_path, "wf/before.txt")
    emulator = emulator_with()
    with notify_listener() as listener, anyio.fail_after(60):
        async with (
            serve_emulator(emulator) as base_url,
            daemon(tmp_path, base_url, listener, "run") as process,
        ):
            assert "READY" in await listener.receive()
            # the file taken under the old routes first: the new ones would not match it
            while "1 results" not in (await listener.until("STATUS"))["STATUS"]:
                pass
            config.write_text(config.read_text().replace("= 5", "= 50") + ROUTE)
            process.send_signal(signal.SIGHUP)
            reloading = await listener.until("RELOADING", "1")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            ready = await listener.until("READY", "1")
            assert ready["STATUS"] == "configuration reloaded"
            put(tmp_path, "new/after.txt")
            while "2 results" not in (await listener.until("STATUS"))["STATUS"]:
                pass
            process.send_signal(signal.SIGTERM)
            code, logs = await finish(process)
    assert code == 0
    documents = outbox_documents(tmp_path / "outbox")
    assert documents["wf/before.txt"][1]["workflow"] == "wf"
    assert documents["new/after.txt"][1]["workflow"] == "routed-wf"  # the new route
    [reloaded] = [line for line in logs if line["event"] == "configuration reloaded"]
    assert reloaded["requests_per_second"] == 50
    assert reloaded["routes"] == 1


async def test_second_sigint_exits_at_once_and_loses_nothing(tmp_path: Path) -> None:
    write_config(tmp_path, rps=20)
    put(tmp_path, "wf/a.txt")
    emulator = emulator_with(slow_rate=1.0, slow_seconds=10_000)
    with notify_listener() as listener, anyio.fail_after(60):
        async with serve_emulator(emulator) as base_url:
            async with daemon(tmp_path, base_url, listener, "run") as process:
                assert "READY" in await listener.receive()
                await emulator.wait_blocked(1)
                process.send_signal(signal.SIGINT)
                await listener.until("STOPPING", "1")
                process.send_signal(signal.SIGINT)  # bem has not answered; do not wait for it
                code, _ = await finish(process)
            assert code == 0
            assert call_states(tmp_path) == [("unknown", None)]  # recorded, resolved later

            emulator.advance(10_000)
            emulator.update(slow_rate=0.0)
            async with daemon(tmp_path, base_url, listener, "drain") as process:
                code, _ = await finish(process)
    assert code == 0
    documents = outbox_documents(tmp_path / "outbox")
    assert list(documents) == ["wf/a.txt"]
    assert documents["wf/a.txt"][0] == "result"
    assert len(emulator.calls) == 1  # resolved by reference, never submitted twice


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_drain_stopped_by_a_signal_exits_4_and_the_next_one_finishes(
    tmp_path: Path, signum: int
) -> None:
    write_config(tmp_path, rps=20)
    for name in ("a", "b", "c"):
        put(tmp_path, f"wf/{name}.txt", name.encode())
    emulator = emulator_with(slow_rate=1.0, slow_seconds=10_000)
    with notify_listener() as listener, anyio.fail_after(60):
        async with serve_emulator(emulator) as base_url:
            async with daemon(tmp_path, base_url, listener, "drain") as process:
                assert "READY" in await listener.receive()
                await emulator.wait_blocked(1)
                process.send_signal(signal.Signals(signum))
                await listener.until("STOPPING", "1")
                emulator.advance(10_000)
                code, logs = await finish(process)
            assert code == 4
            [stopped] = [line for line in logs if line["event"] == "runner stopped"]
            assert stopped["exit_code"] == 4
            assert len(outbox_documents(tmp_path / "outbox")) < 3

            emulator.update(slow_rate=0.0)
            async with daemon(tmp_path, base_url, listener, "drain") as process:
                code, _ = await finish(process)
    assert code == 0
    assert sorted(outbox_documents(tmp_path / "outbox")) == ["wf/a.txt", "wf/b.txt", "wf/c.txt"]
    assert len(emulator.calls) == 3


async def test_one_state_has_one_owner_and_a_killed_owner_leaves_no_lock(tmp_path: Path) -> None:
    write_config(tmp_path, rps=20)
    put(tmp_path, "wf/a.txt")
    emulator = emulator_with()
    with notify_listener() as listener, anyio.fail_after(60):
        async with serve_emulator(emulator) as base_url:
            async with daemon(tmp_path, base_url, listener, "run") as owner:
                assert "READY" in await listener.receive()
                for command in ("drain", "run", "retry"):
                    async with daemon(tmp_path, base_url, listener, command) as second:
                        assert second.stderr is not None
                        message = b"".join([chunk async for chunk in second.stderr]).decode()
                        assert await second.wait() == 2
                    assert f"state {tmp_path / 'state.db'} is in use by pid {owner.pid}" in message
                async with daemon(tmp_path, base_url, listener, "status", "--json") as status:
                    assert status.stdout is not None
                    report = json.loads(b"".join([chunk async for chunk in status.stdout]))
                    assert await status.wait() == 0  # status reads without taking the state
                assert "files" in report
                owner.kill()
                await owner.wait()
            put(tmp_path, "wf/b.txt")
            async with daemon(tmp_path, base_url, listener, "drain") as process:
                code, _ = await finish(process)
    assert code == 0  # the SIGKILLed owner's lock died with it
    assert sorted(outbox_documents(tmp_path / "outbox")) == ["wf/a.txt", "wf/b.txt"]


async def test_a_relative_inbox_takes_new_files_from_file_events(tmp_path: Path) -> None:
    """Paths are resolved once at load, so events under a relative inbox are not dropped: a
    file dropped after start arrives long before the (here 10-minute) rescan."""
    (tmp_path / "bem-runner.toml").write_text(
        CONFIG.format(root=".", rps=20).replace("rescan_seconds = 0.2", "rescan_seconds = 600")
    )
    emulator = emulator_with()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEM_", "NOTIFY_"))}
    with notify_listener() as listener, anyio.fail_after(60):
        env.update(NOTIFY_SOCKET=listener.address, BEM_API_KEY=API_KEY)
        async with serve_emulator(emulator) as base_url:
            env["BEM_BASE_URL"] = base_url
            args = [sys.executable, "-m", "runner", "--config", "bem-runner.toml", "run"]
            async with await anyio.open_process(args, env=env, cwd=tmp_path) as process:
                assert "READY" in await listener.receive()
                put(tmp_path, "wf/late.txt")
                while "1 results" not in (await listener.until("STATUS"))["STATUS"]:
                    pass
                process.send_signal(signal.SIGTERM)
                code, _ = await finish(process)
    assert code == 0
    assert list(outbox_documents(tmp_path / "outbox")) == ["wf/late.txt"]
