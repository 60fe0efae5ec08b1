"""One rate budget shared by every runner of a PostgreSQL store, timed by the database's clock.

Time passes by moving the bucket's timestamps back in the database, never by waiting.
"""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.store.postgres import PostgresStore
from runner.store.postgres_budget import MIN_RATE_FACTOR, tokens_taken
from tests.conftest import run_sql

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]

SLOW = 1e-6
"""A rate so low that no token accrues while a test runs."""


async def test_a_new_budget_is_full_and_is_shared(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    first = await a.take_tokens(3, rate=SLOW, burst=5)
    assert (first.granted, first.wait_seconds) == (3, 0.0)
    second = await b.take_tokens(3, rate=SLOW, burst=5)
    assert second.granted == 2
    assert second.wait_seconds > 1000  # a token a million seconds


async def test_runners_taking_at_once_never_get_more_than_the_bucket_holds(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    granted: list[int] = []

    async def take(store: PostgresStore) -> None:
        for _ in range(5):
            granted.append((await store.take_tokens(1, rate=SLOW, burst=12)).granted)

    async with anyio.create_task_group() as tg:
        for store in (*runners, *runners):
            tg.start_soon(take, store)
    assert sum(granted) == 12
    assert len(granted) == 20


async def test_tokens_accrue_by_the_database_clock(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    assert (await a.take_tokens(10, rate=1.0, burst=10)).granted == 10
    empty = await b.take_tokens(1, rate=1.0, burst=10)
    assert empty.granted == 0
    assert 0 < empty.wait_seconds <= 1.0
    run_sql(postgres_url, "UPDATE rate_bucket SET updated_at = updated_at - interval '3 seconds'")
    assert (await b.take_tokens(10, rate=1.0, burst=10)).granted == 3
    run_sql(postgres_url, "UPDATE rate_bucket SET updated_at = updated_at - interval '1 hour'")
    assert (await a.take_tokens(50, rate=1.0, burst=10)).granted == 10  # never above the burst


async def test_a_429_pauses_every_runner_and_halves_their_rate(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    await a.take_tokens(1, rate=10.0, burst=10)
    await a.pause_sending(60.0)
    paused = await b.take_tokens(1, rate=10.0, burst=10)
    assert paused.granted == 0
    assert 59.0 < paused.wait_seconds <= 60.0 + 1 / 5.0
    assert run_sql(postgres_url, "SELECT factor, tokens FROM rate_bucket") == [(0.5, 0.0)]
    await b.pause_sending(30.0)  # a second 429 inside the pause: the rate is not cut again
    assert run_sql(postgres_url, "SELECT factor FROM rate_bucket") == [(0.5,)]

    # the pause over, tokens accrue at the halved rate and the rate comes back
    run_sql(
        postgres_url,
        "UPDATE rate_bucket SET paused_until = now() - interval '2 seconds', "
        "updated_at = now() - interval '70 seconds'",
    )
    assert (await a.take_tokens(100, rate=10.0, burst=100)).granted == 10  # 2 s at 5 per second
    (factor,) = run_sql(postgres_url, "SELECT factor FROM rate_bucket")[0]
    assert isinstance(factor, float)
    assert 0.5 < factor < 1.0


async def test_the_rate_is_never_cut_below_its_floor(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, _ = runners
    for _ in range(10):
        await a.pause_sending(1.0)
        run_sql(postgres_url, "UPDATE rate_bucket SET paused_until = now() - interval '1 ms'")
    (factor,) = run_sql(postgres_url, "SELECT factor FROM rate_bucket")[0]
    assert isinstance(factor, float)
    assert MIN_RATE_FACTOR <= factor < MIN_RATE_FACTOR * 1.01


@given(
    want=st.integers(1, 100),
    granted=st.integers(0, 100),
    left=st.floats(0, 0.999),
    rate=st.floats(1e-3, 1e4),
    paused_for=st.floats(0, 1e4),
)
def test_a_take_says_when_to_ask_again_exactly_when_it_fell_short(
    want: int, granted: int, left: float, rate: float, paused_for: float
) -> None:
    granted = min(granted, want)
    tokens = tokens_taken(want=want, granted=granted, left=left, rate=rate, paused_for=paused_for)
    assert tokens.granted == granted
    assert (tokens.wait_seconds > 0) == (granted < want)
    if granted < want:
        assert tokens.wait_seconds >= paused_for
