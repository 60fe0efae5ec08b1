"""Several ``python -m runner run`` processes on one PostgreSQL store and one inbox, against the
emulator served over real HTTP with the account's rate limit.

Whatever happens to a runner or to PostgreSQL, every file ends as exactly one outbox document,
bem sees one call per ``callReferenceID`` and no file in two calls, and the runners share the
account's rate budget (no 429 while they run). Waits are bounded loops on what can be observed
(outbox documents, the store's rows), never fixed sleeps.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pytest

from runner.emulator import Emulator, EmulatorSettings, serve_emulator
from runner.store.postgres import open_postgres_store

from .conftest import run_sql
from .harness import API_KEY, KILLED, Workspace, unique_files
from .pipeline import leftover_temporaries, outbox_documents

if TYPE_CHECKING:
    from .postgres import Cluster

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]

RATE = 20.0
"""The account's rate limit (requests per second); the runners are configured with it."""
ACCOUNT_BURST = 10
RUNNER_BURST = 5
RUNNERS = 3
FILES = 45
DEADLINE_SECONDS = 45.0
"""No wait below may take longer (a hang is a failure); each test takes far less."""
LOOK_EVERY = 0.1
SHORT_LEASE = 5.0
"""Where the others must take over a dead runner's work: short, yet long enough that a live one
on a loaded machine never misses its heartbeats for that long."""


def emulator(seed: int) -> Emulator:
    return Emulator(
        EmulatorSettings(
            api_key=API_KEY,
            latency_min=0.2,
            latency_max=0.6,
            list_visibility_lag=0.2,
            rate_limit_rps=RATE,
            rate_limit_burst=ACCOUNT_BURST,
            seed=seed,
        )
    )


def workspace(root: Path, base_url: str, *, lease_seconds: float) -> Workspace:
    space = Workspace(root, base_url)
    space.settings = {
        "limits": {"requests_per_second": RATE, "burst": RUNNER_BURST},
        "store": {"lease_seconds": lease_seconds},
    }
    space.write_config()
    return space


async def start_runner(
    space: Workspace, store_url: str, *, crash_at: str | None = None, command: str = "run"
) -> anyio.abc.Process:
    """``python -m runner run`` (or ``drain``) on the shared store, its password from the
    environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BEM_", "PG"))}
    environ |= {
        "BEM_API_KEY": API_KEY,
        "BEM_RUNNER_CONFIG": str(space.config_file),
        "BEM_RUNNER_STORE_URL": store_url,
    }
    if crash_at is not None:
        environ["BEM_RUNNER_CRASH_AT"] = crash_at
    space.runs += 1
    with space.log.open("ab") as log:
        log.write(f"--- runner {space.runs} crash_at={crash_at}\n".encode())
        return await anyio.open_process(
            [sys.executable, "-m", "runner", command], stdout=log, stderr=log, env=environ
        )


async def until(what: str, space: Workspace, done: Any) -> None:
    """Look at ``done()`` every :data:`LOOK_EVERY` until it holds, for at most the deadline."""
    for _ in range(round(DEADLINE_SECONDS / LOOK_EVERY)):
        if done():
            return
        await anyio.sleep(LOOK_EVERY)
    pytest.fail(f"not within {DEADLINE_SECONDS} s: {what}\n{space.log.read_text()[-4000:]}")


def started(space: Workspace) -> int:
    return space.log.read_text().count('"event": "runner started"')


def delivered(space: Workspace) -> int:
    return len(outbox_documents(space.outbox))


def everything_delivered(space: Workspace) -> bool:
    inbox_empty = not [p for p in space.inbox.rglob("*") if p.is_file()]
    return inbox_empty and delivered(space) == len(space.written)


async def stop(space: Workspace, processes: list[anyio.abc.Process]) -> None:
    """SIGTERM each runner still alive, once every one has started (signals are its own from
    then on); each exits 0."""
    await until("every runner started", space, lambda: started(space) >= space.runs)
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    with anyio.fail_after(DEADLINE_SECONDS):
        codes = [await process.wait() for process in processes]
    assert all(code in (0, KILLED) for code in codes), (codes, space.log.read_text()[-4000:])


def check_exactly_once(space: Workspace, served: Emulator, store_url: str) -> None:
    """Nothing lost, nothing sent twice, nothing half-written; the store agrees."""
    documents = outbox_documents(space.outbox)
    assert sorted(documents) == sorted(space.written), "every input has exactly one document"
    assert {kind for kind, _ in documents.values()} == {"result"}
    stats = served.stats()
    assert {r: n for r, n in stats["calls_by_reference"].items() if n != 1} == {}
    assert {s: n for s, n in stats["files_by_content_sha256"].items() if n != 1} == {}
    assert leftover_temporaries(space.outbox) == []
    assert run_sql(store_url, "SELECT state, count(*) FROM files GROUP BY state") == [
        ("done", len(space.written))
    ]
    assert run_sql(store_url, "SELECT count(*) FROM calls WHERE state <> 'done'") == [(0,)]


def drop_files(space: Workspace, seed: int, count: int = FILES) -> None:
    for rel, content in unique_files(random.Random(seed), 0, count):
        space.drop(rel, content)


async def test_three_runners_share_one_inbox_one_queue_and_one_rate_budget(
    tmp_path: Path, postgres_url: str
) -> None:
    served = emulator(seed=11)
    async with serve_emulator(served) as base_url:
        space = workspace(tmp_path, base_url, lease_seconds=10)
        drop_files(space, seed=11)
        processes = [await start_runner(space, postgres_url) for _ in range(RUNNERS)]
        try:
            await until("every file delivered", space, lambda: everything_delivered(space))
        finally:
            await stop(space, processes)
        check_exactly_once(space, served, postgres_url)
        stats = served.stats()
        assert stats["rate_limited"] == 0, "one budget for all runners: no 429"
        assert sum(stats["requests"]["POST /v3/workflows/{workflowName}/call"].values()) == len(
            stats["calls_by_reference"]
        ), "no POST refused or repeated"
    log = space.log.read_text()
    assert "Traceback" not in log
    assert "the store cannot be reached" not in log


async def test_the_others_finish_the_work_of_runners_that_died(
    tmp_path: Path, postgres_url: str
) -> None:
    served = emulator(seed=12)
    async with serve_emulator(served) as base_url:
        space = workspace(tmp_path, base_url, lease_seconds=SHORT_LEASE)
        drop_files(space, seed=12)
        # one runner dies right after bem created its first call, before recording it: the
        # call is found again by listing its callReferenceID, never sent twice
        crashing = await start_runner(space, postgres_url, crash_at="submit.after_receive")
        with anyio.fail_after(DEADLINE_SECONDS):
            await crashing.wait()
        processes = [crashing] + [await start_runner(space, postgres_url) for _ in range(2)]
        try:
            await until("a quarter delivered", space, lambda: delivered(space) >= FILES // 4)
            # and another is SIGKILLed in the middle of its work
            processes[1].send_signal(signal.SIGKILL)
            await until("every file delivered", space, lambda: everything_delivered(space))
        finally:
            await stop(space, processes)
        assert crashing.returncode == KILLED
        assert processes[1].returncode == KILLED
        check_exactly_once(space, served, postgres_url)
    assert "runners silent past their lease" in space.log.read_text()


async def test_nothing_is_lost_or_sent_twice_when_postgresql_restarts_mid_run(
    tmp_path: Path, postgres_cluster: Cluster, postgres_url: str
) -> None:
    served = emulator(seed=13)
    async with serve_emulator(served) as base_url:
        space = workspace(tmp_path, base_url, lease_seconds=20)
        drop_files(space, seed=13)
        processes = [await start_runner(space, postgres_url) for _ in range(2)]
        try:
            await until("a quarter delivered", space, lambda: delivered(space) >= FILES // 4)
            await anyio.to_thread.run_sync(postgres_cluster.restart)
            await until("every file delivered", space, lambda: everything_delivered(space))
        finally:
            await stop(space, processes)
        assert [p.returncode for p in processes] == [0, 0]
        check_exactly_once(space, served, postgres_url)


async def test_a_drain_exits_3_when_postgresql_is_gone_and_loses_nothing(
    tmp_path: Path, postgres_cluster: Cluster, postgres_url: str
) -> None:
    served = emulator(seed=14)
    async with serve_emulator(served) as base_url:
        # the runner could not leave the store: the next one takes its work once its lease ends
        space = workspace(tmp_path, base_url, lease_seconds=SHORT_LEASE)
        space.settings["api"] = {"unreachable_timeout": "2s"}
        space.write_config()
        drop_files(space, seed=14)
        draining = await start_runner(space, postgres_url, command="drain")
        try:
            await until("a quarter delivered", space, lambda: delivered(space) >= FILES // 4)
            await anyio.to_thread.run_sync(postgres_cluster.stop)
            with anyio.fail_after(DEADLINE_SECONDS):
                code = await draining.wait()
        finally:
            if draining.returncode is None:
                draining.kill()
            await anyio.to_thread.run_sync(postgres_cluster.start)
        assert code == 3, space.log.read_text()[-4000:]
        assert "the store cannot be reached" in space.log.read_text()
        again = await start_runner(space, postgres_url, command="drain")
        with anyio.fail_after(DEADLINE_SECONDS):
            assert await again.wait() == 0, space.log.read_text()[-4000:]
        check_exactly_once(space, served, postgres_url)


async def test_files_arriving_while_runners_come_and_go_are_each_taken_once(
    tmp_path: Path, postgres_url: str
) -> None:
    served = emulator(seed=15)
    rng = random.Random(15)
    waves = [unique_files(rng, start, FILES // 3) for start in range(0, FILES, FILES // 3)]
    async with serve_emulator(served) as base_url:
        space = workspace(tmp_path, base_url, lease_seconds=10)
        first, second, third = waves
        processes = [await start_runner(space, postgres_url) for _ in range(2)]
        try:
            for rel, content in first:
                space.drop(rel, content)
            await until("the first wave delivered", space, lambda: delivered(space) >= len(first))
            processes[0].send_signal(signal.SIGTERM)  # one leaves, another comes
            processes.append(await start_runner(space, postgres_url))
            for rel, content in second:
                space.drop(rel, content)
            with anyio.fail_after(DEADLINE_SECONDS):
                assert await processes[0].wait() == 0
            processes.append(await start_runner(space, postgres_url))
            for rel, content in third:
                space.drop(rel, content)
            await until("every file delivered", space, lambda: everything_delivered(space))
        finally:
            await stop(space, processes)
        check_exactly_once(space, served, postgres_url)


REJOINED = "declared dead by the other runners; joining again"


async def declare_dead(store_url: str, runner_id: str) -> None:
    """Another runner finds ``runner_id`` silent past its lease (its heartbeat moved back in the
    database) and expires it; tried again should the runner's own heartbeat land in between."""
    async with open_postgres_store(
        store_url, runner_id="other", lease_seconds=SHORT_LEASE
    ) as other:
        for _ in range(round(DEADLINE_SECONDS / LOOK_EVERY)):
            silent = f"now() - interval '{DEADLINE_SECONDS} seconds'"
            run_sql(
                store_url, f"UPDATE runners SET heartbeat_at = {silent} WHERE id = '{runner_id}'"
            )
            if await other.expire_runners() == [runner_id]:
                return
    pytest.fail(f"{runner_id} was never expired")


async def test_a_runner_declared_dead_joins_again_and_every_file_is_delivered_once(
    tmp_path: Path, postgres_url: str
) -> None:
    served = emulator(seed=16)
    rng = random.Random(16)
    first, second = unique_files(rng, 0, FILES // 2), unique_files(rng, FILES // 2, FILES // 2)
    async with serve_emulator(served) as base_url:
        space = workspace(tmp_path, base_url, lease_seconds=SHORT_LEASE)
        space.settings["store"]["runner_id"] = "slow"
        space.write_config()
        for rel, content in first:
            space.drop(rel, content)
        process = await start_runner(space, postgres_url)
        try:
            await until("a quarter delivered", space, lambda: delivered(space) >= FILES // 4)
            # its claims freed, its POSTs in flight unknown: resolved by listing, never resent
            await declare_dead(postgres_url, "slow")
            await until("joined again", space, lambda: REJOINED in space.log.read_text())
            for rel, content in second:
                space.drop(rel, content)
            await until("every file delivered", space, lambda: everything_delivered(space))
        finally:
            await stop(space, [process])
        assert process.returncode == 0
        check_exactly_once(space, served, postgres_url)
    log = space.log.read_text()
    assert log.count(REJOINED) == 1
    assert "Traceback" not in log
    assert run_sql(postgres_url, "SELECT id FROM runners") == []
