"""The rules the stages follow on a store shared by several runners, one stage or part at a time,
on a real PostgreSQL store: one intake per file, one rate budget, a lost claim dropped quietly."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import httpx
import pytest

from runner.api.client import BemClient
from runner.clock import FakeClock
from runner.context import Context
from runner.poll import CLAIMED_ELSEWHERE_WAIT, Poller
from runner.ratelimit import RateLimiter
from runner.route import Destination
from runner.shared_budget import SharedBudget, batch_size
from runner.store.base import FileRow, NewFile
from runner.store.postgres import PostgresStore

from .conftest import frozen_emulator, run_sql
from .fake_time import fake_clock
from .pipeline import API_KEY, make_config

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]

HOUR = 3600.0
NEVER_REFILLS = 1e-6
"""A shared rate so low that no token comes back while a test runs."""


def settled(rel: str, *, size: int = 1, mtime_ns: int = 1, sha256: str = "aa") -> NewFile:
    return NewFile(rel, size, mtime_ns, sha256, "text", Destination("wf", "file", rel, "x"))


def folder_file(rel: str) -> NewFile:
    return NewFile(rel, 1, 1, rel, "text", Destination("wf", "folder", "wf/batch", rel))


# -- intake ---------------------------------------------------------------------------------


async def test_a_file_handed_over_by_every_runner_is_taken_by_exactly_one(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    await a.add_files([settled("wf/x.txt"), folder_file("wf/batch/1")], now=1.0, batch_limits={})
    await b.add_files([settled("wf/x.txt"), folder_file("wf/batch/1")], now=1.0, batch_limits={})
    counts = await a.counts()
    assert counts.files == {"queued": 2}
    assert sum(counts.calls.values()) == 2  # one file call, one folder call
    (folder,) = await b.collecting_calls()
    assert folder.file_count == 1


async def test_a_finished_file_is_not_taken_again_unless_it_changed(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    await a.add_files([settled("wf/x.txt")], now=1.0, batch_limits={})
    (file,) = await _queued(a)
    await a.reject_queued_file(file, "gone")
    await a.mark_delivered([], finished_calls=[], now=2.0)
    await a.mark_done([file.id], now=2.0)
    # another runner settled the very same file before it was archived: not taken again
    await b.add_files([settled("wf/x.txt")], now=3.0, batch_limits={})
    assert "queued" not in (await b.counts()).files
    # the same name with other content (or size, or mtime) is new work
    await b.add_files([settled("wf/x.txt", sha256="bb")], now=4.0, batch_limits={})
    assert (await b.counts()).files.get("queued") == 1


async def _queued(store: PostgresStore) -> list[FileRow]:
    calls = await store.ready_calls(now=HOUR, limit=10)
    files = await store.files_of_calls([g.id for g in calls])
    return [f for rows in files.values() for f in rows]


# -- one rate budget ------------------------------------------------------------------------


def shared_limiter(store: PostgresStore, clock: FakeClock, *, burst: int) -> RateLimiter:
    """A runner's limiter: its own pace far above the shared one, which is the limit."""
    budget = SharedBudget(store, rate=NEVER_REFILLS, burst=burst, clock=clock)
    return RateLimiter(rate=1000.0, burst=100, max_concurrency=100, clock=clock, shared=budget)


async def test_the_runners_limiters_draw_from_one_budget_in_the_store(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    clock = fake_clock()
    burst = 3
    limiters = [shared_limiter(store, clock, burst=burst) for store in runners]
    granted = 0

    async def request(limiter: RateLimiter) -> None:
        nonlocal granted
        async with limiter.slot():
            granted += 1
            await anyio.sleep_forever()  # hold it: the test counts what was granted

    async with anyio.create_task_group() as tg:
        for limiter in limiters:
            for _ in range(burst):
                tg.start_soon(request, limiter)
        # each runner's budget sleeps on the clock once the store grants it nothing more
        await clock.wait_for_sleepers(len(limiters))
        assert granted == burst, "the runners together were granted the one bucket's burst"
        tg.cancel_scope.cancel()


async def test_a_429_seen_by_one_runner_pauses_every_runner(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    clock = fake_clock()
    limiter = RateLimiter(
        rate=100.0,
        burst=10,
        max_concurrency=4,
        clock=clock,
        shared=SharedBudget(a, rate=100.0, burst=10, clock=clock),
    )
    async with limiter.slot():
        limiter.on_rate_limited(HOUR)
    taken = await b.take_tokens(1, rate=100.0, burst=10)
    assert taken.granted == 0
    assert taken.wait_seconds > HOUR / 2


def test_a_take_asks_for_a_tenth_of_a_second_of_the_rate() -> None:
    assert batch_size(50.0, 10) == 5
    assert batch_size(2.0, 10) == 1
    assert batch_size(1000.0, 100) == 8
    assert batch_size(1000.0, 2) == 2


# -- a claim lost in the middle of the work -------------------------------------------------

SLOW_SECONDS = 5.0


async def test_a_poll_whose_claim_another_runner_took_is_dropped_quietly(
    tmp_path: Path, postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    clock = fake_clock()
    # every answer waits for the test to move the emulator's time: the poll is in flight
    emulator = frozen_emulator(api_key=API_KEY, slow_rate=1.0, slow_seconds=SLOW_SECONDS)
    config = make_config(tmp_path)
    await a.add_files([settled("wf/x.txt")], now=clock.wall(), batch_limits={})
    (call,) = await a.claim_ready(now=clock.wall(), limit=1)
    await a.mark_sending([call.id], now=clock.wall())
    await a.mark_submitted(
        call.id, call_id="call_x", status="running", now=clock.wall(), next_poll=clock.wall()
    )
    before = await b.call(call.id)
    async with BemClient(
        base_url=config.api.base_url,
        api_key=API_KEY,
        transport=httpx.ASGITransport(app=emulator.app),
        clock=clock,
    ) as client:
        ctx = Context(config, a, client, clock, draining=False, rng=random.Random(0))
        ctx.runner_id = "a"
        async with anyio.create_task_group() as tg:
            waits: list[float] = []

            async def poll() -> None:
                waits.append(await Poller(ctx).poll_due())

            tg.start_soon(poll)
            await emulator.wait_blocked()
            # a was slow past its lease: b takes the call over while a's poll is in flight
            run_sql(postgres_url, "UPDATE calls SET lease_until = now() - interval '1 second'")
            assert [g.id for g in await b.claim_due_polls(now=clock.wall(), limit=9)] == [call.id]
            emulator.advance(SLOW_SECONDS)
    assert waits == [CLAIMED_ELSEWHERE_WAIT], "nothing raised; the call is b's to poll now"
    assert await b.call(call.id) == before, "a wrote nothing"
    assert run_sql(postgres_url, f"SELECT claimed_by FROM calls WHERE id = {call.id}") == [("b",)]
