"""Wake-ups between runners of a PostgreSQL store: work one runner makes is news to the others."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest

from runner.route import Destination
from runner.store.base import Finished, NewFile
from runner.store.postgres import PostgresStore, open_postgres_store

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]

NEWS_TIMEOUT_SECONDS = 10.0
"""A bound on a wait that a notification ends at once; reached only when the test fails."""


def _file(rel: str, *, mode: str = "file", reason: str | None = None) -> NewFile:
    key = rel if mode == "file" else rel.rsplit("/", 1)[0]
    return NewFile(rel, 1, 1, None, "text", Destination("wf", mode, key, "x"), reason)  # type: ignore[arg-type]


async def _next(wakes: AsyncIterator[str]) -> str:
    with anyio.fail_after(NEWS_TIMEOUT_SECONDS):
        return await anext(wakes)


async def test_each_step_of_a_call_wakes_the_stage_that_takes_it_next(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    async with a.wake_ups() as wakes:
        await b.add_files([_file("wf/x")], now=1.0, batch_limits={})
        assert {await _next(wakes), await _next(wakes)} == {"submit", "deliver"}
        (call,) = await b.claim_ready(now=1.0, limit=1)
        await b.mark_sending([call.id], now=2.0)  # nothing for anyone else yet
        await b.mark_submitted(call.id, call_id="c", status=None, now=3.0, next_poll=4.0)
        assert await _next(wakes) == "poll"
        await b.mark_terminal([Finished(call.id, "completed", None, None)], now=5.0)
        assert [await _next(wakes), await _next(wakes)] == ["deliver", "submit"]


async def test_a_runner_is_not_woken_by_its_own_writes(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    async with a.wake_ups() as wakes:
        await a.add_files([_file("wf/mine")], now=1.0, batch_limits={})
        await b.add_files([_file("wf/f/theirs", mode="folder")], now=1.0, batch_limits={})
        (folder,) = await b.collecting_calls()
        await b.close_batch(folder.id)
        # a's own add came first, yet the first news is b's
        assert [await _next(wakes) for _ in range(3)] == ["submit", "deliver", "submit"]


async def test_a_dead_runner_expired_wakes_every_stage(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    async with open_postgres_store(postgres_url, runner_id="c") as c, c.wake_ups() as wakes:
        await b.add_files([_file("wf/x")], now=1.0, batch_limits={})
        assert {await _next(wakes), await _next(wakes)} == {"submit", "deliver"}
        await a.claim_ready(now=1.0, limit=1)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("UPDATE runners SET heartbeat_at = now() - interval '1 hour'"
                         " WHERE id = 'a'")  # fmt: skip
        assert await b.expire_runners() == ["a"]
        assert {await _next(wakes) for _ in range(3)} == {"submit", "poll", "deliver"}
