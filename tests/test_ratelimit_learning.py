"""The rate limiter learns the account's rate from 429s and stays under it.

The runner may be configured far faster than the account allows (issue 9: 50 req/s against an
account of 2 req/s gave 34 × 429 in 169 requests, and a third of the second half). These tests
run the real :class:`RateLimiter` against bem's own token bucket on a fake clock
(``tests/ratelimit_sim.py``), through the emulator with the real API client, and check the
policy itself (:class:`RateState`) as pure functions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import anyio
import anyio.lowlevel
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.api.client import BemClient
from runner.bucket import MARGIN, PROBE_GROWTH, Mark, RateState, TokenBucket
from runner.clock import FakeClock
from runner.emulator import Emulator, EmulatorSettings
from runner.errors import RateLimitedError
from runner.ratelimit import RateLimiter

from .ratelimit_sim import Account, RetryAfterStyle, Run, Runner, Sent, run

STYLES: tuple[RetryAfterStyle, ...] = ("seconds", "http-date", "absent")


def refused(sent: list[Sent]) -> int:
    return sum(s.refused for s in sent)


def simulate(account: Account, runner: Runner, *, requests: int, seed: int = 0) -> Run:
    return anyio.run(lambda: run(account, runner, requests=requests, seed=seed), backend="asyncio")


# -- configured 10× and 25× too high ------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(("true_rate", "configured"), [(2.0, 50.0), (5.0, 50.0)])
def test_configured_far_above_the_account_settles_under_it(
    true_rate: float, configured: float, style: RetryAfterStyle
) -> None:
    # the daemon's limits for a config of 50 req/s and burst 10; bem's bucket of burst 10;
    # up to 8 requests in flight, each 0.05-0.3 s there and back
    result = simulate(
        Account(true_rate, burst=10, retry_after=style),
        Runner(configured * 0.97, burst=9, max_concurrency=8, latency=(0.05, 0.3)),
        requests=300,
    )
    first, second = result.halves()
    assert result.early == 0  # no request sent while a Retry-After it had heard forbade it
    assert result.refused <= 0.1 * len(result.sent)
    assert refused(second) < refused(first)
    assert refused(second) <= 0.05 * len(second)
    # ... and not by crawling: the second half runs at most of the account's rate
    assert result.accepted_rate(second) >= 0.75 * true_rate


@pytest.mark.parametrize("style", STYLES)
def test_a_short_drain_against_an_account_25_times_slower(style: RetryAfterStyle) -> None:
    """The run of issue 9: 169 requests, 2 req/s allowed, 50 configured."""
    result = simulate(
        Account(2.0, burst=10, retry_after=style),
        Runner(50 * 0.97, burst=9, max_concurrency=8, latency=(0.05, 0.3)),
        requests=160,
    )
    first, second = result.halves()
    assert result.refused <= 0.1 * len(result.sent)
    assert refused(second) < refused(first)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # ~0.2 s each
@given(
    true_rate=st.floats(0.5, 20.0),
    too_high=st.floats(2.0, 25.0),
    burst=st.integers(2, 12),
    account_burst_offset=st.integers(-2, 1),
    latency=st.tuples(st.floats(0.0, 0.3), st.floats(0.0, 0.3)),
    max_concurrency=st.integers(1, 16),
    style=st.sampled_from(STYLES),
    seed=st.integers(0, 2**16),
)
def test_any_account_below_the_configured_rate_is_learnt(
    true_rate: float,
    too_high: float,
    burst: int,
    account_burst_offset: int,
    latency: tuple[float, float],
    max_concurrency: int,
    style: RetryAfterStyle,
    seed: int,
) -> None:
    fastest, spread = latency
    result = simulate(
        Account(true_rate, burst=max(1, burst + account_burst_offset), retry_after=style),
        Runner(
            true_rate * too_high,
            burst=burst,
            max_concurrency=max_concurrency,
            latency=(fastest, fastest + spread),
        ),
        requests=300,
        seed=seed,
    )
    _, second = result.halves()
    assert result.early == 0
    # The requests already on their way when the first 429 comes back are refused too, and
    # nothing can call them back: up to one per concurrency slot. Beyond those, at most 1 in 10.
    assert result.refused - max_concurrency <= 0.1 * len(result.sent)
    # once learnt, only the odd probe above the account's rate is refused (when the rate was
    # only a little too high to start with, the two halves look alike)
    assert refused(second) <= 0.05 * len(second)


# -- the same through the emulator and the API client -------------------------------------------


@pytest.mark.anyio
async def test_through_the_emulator_a_drain_settles_under_the_account_rate() -> None:
    """``BemClient`` over ``httpx.ASGITransport`` against the emulator's own rate limit, all on
    one fake clock. The emulator answers at once (no latency: its waits run on the real clock),
    and ``Retry-After`` is in seconds (an HTTP date is computed from the real wall clock)."""
    clock = FakeClock()
    emulator = Emulator(
        EmulatorSettings(
            api_key="k",
            latency_min=0.0,
            latency_max=0.0,
            rate_limit_rps=2.0,
            rate_limit_burst=10,
            retry_after_format="seconds",
        ),
        clock=clock.now,
    )
    max_concurrency = 8
    limiter = RateLimiter(rate=50 * 0.97, burst=9, max_concurrency=max_concurrency, clock=clock)
    workers, requests = 16, 200
    remaining = requests
    busy = 0
    halfway: dict[str, int] | None = None

    def totals() -> dict[str, int]:
        stats = emulator.stats()
        sent = sum(sum(by_status.values()) for by_status in stats["requests"].values())
        return {"sent": sent, "refused": stats["rate_limited"]}

    async def worker(client: BemClient) -> None:
        nonlocal remaining, busy
        busy += 1
        try:
            while remaining > 0:
                remaining -= 1
                while True:
                    try:
                        await client.list_calls()
                        break
                    except RateLimitedError:  # gave up after its retries: try again
                        pass
        finally:
            busy -= 1

    def quiet() -> bool:
        """Every worker waits: for a slot, or asleep on the clock (a retry's back-off, or the
        limiter's timekeeper); nothing is in flight, as the emulator answers at once."""
        timekeeper = limiter.waiting > 0 and limiter.in_flight < max_concurrency
        asleep = clock.sleepers - timekeeper
        return limiter.in_flight == 0 and busy == limiter.waiting + asleep

    client = BemClient(
        base_url="http://bem.test",
        api_key="k",
        transport=httpx.ASGITransport(app=emulator.app),
        clock=clock,
        limiter=limiter,
        rng=random.Random(3),
    )
    async with client, anyio.create_task_group() as tasks:
        for _ in range(workers):
            tasks.start_soon(worker, client)
        await anyio.lowlevel.checkpoint()
        while busy:
            for _ in range(100_000):
                if quiet():
                    break
                await anyio.lowlevel.checkpoint()
            else:
                raise AssertionError("the requests never settled")
            if halfway is None and totals()["sent"] >= requests / 2:
                halfway = totals()
            if busy:
                assert clock.advance_to_next_deadline() is not None

    end = totals()
    stats = emulator.stats()
    assert halfway is not None
    assert end["refused"] > 0  # it did overrun
    assert stats["requests_before_retry_after"] == 0
    assert end["refused"] <= 0.1 * end["sent"]
    second_sent = end["sent"] - halfway["sent"]
    second_refused = end["refused"] - halfway["refused"]
    assert second_refused < halfway["refused"]
    assert second_refused <= 0.05 * second_sent
    assert limiter.learnt_rate is not None
    assert limiter.learnt_rate <= 2.0 * 1.1


# -- answers to requests already in flight ------------------------------------------------------


@dataclass
class Request:
    """A task holding a slot until told how bem answered; reports it from inside the slot."""

    limiter: RateLimiter
    clock: FakeClock
    granted_at: float | None = None
    answer: float | str | None = "pending"  # a Retry-After (or None) for a 429; "ok"
    answered: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        async with self.limiter.slot():
            self.granted_at = self.clock.now()
            await self.answered.wait()
            if self.answer == "ok":
                self.limiter.on_success()
            else:
                assert not isinstance(self.answer, str)
                self.limiter.on_rate_limited(self.answer)

    def reply(self, answer: float | str | None) -> None:
        self.answer = answer
        self.answered.set()


async def until(condition: Callable[[], bool], *, turns: int = 1000) -> None:
    for _ in range(turns):
        if condition():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition never became true")


@pytest.mark.anyio
async def test_a_429_to_a_request_sent_before_the_last_one_is_the_same_overrun() -> None:
    """Even when it comes after the pause is over (a short HTTP-date ``Retry-After``)."""
    clock = FakeClock()
    limiter = RateLimiter(rate=16.0, burst=4, max_concurrency=4, clock=clock)
    early = [Request(limiter, clock) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for request in early:
            tg.start_soon(request.run)
        await until(lambda: limiter.in_flight == 4)
        early[0].reply(0.5)
        await until(lambda: limiter.in_flight == 3)
        assert limiter.current_rate == 8.0
        clock.advance(1.0)  # the pause is over...
        for request in early[1:]:
            request.reply(0.0)  # ...when the others, sent before it, come back 429 too
        await until(lambda: limiter.in_flight == 0)
        assert limiter.current_rate == 8.0  # cut once
        late = Request(limiter, clock)
        tg.start_soon(late.run)
        await until(lambda: clock.sleepers == 1 or late.granted_at is not None)
        clock.advance_to_next_deadline()
        await until(lambda: late.granted_at is not None)
        late.reply(0.0)  # a request sent after the overrun: a new one
    assert limiter.current_rate == 4.0


@pytest.mark.anyio
@pytest.mark.parametrize(("refused_too", "first_grant_after"), [(0, 3 / 5), (1, 2 / 5)])
async def test_requests_in_flight_at_a_429_count_against_the_new_rate(
    refused_too: int, first_grant_after: float
) -> None:
    """Two requests are in flight when the 429 comes: each will use one of the account's tokens,
    so the bucket owes two of the new rate; one that comes back 429 too used none and is given
    back."""
    clock = FakeClock()
    limiter = RateLimiter(rate=10.0, burst=5, max_concurrency=10, clock=clock)
    refused_first, *in_flight = (Request(limiter, clock) for _ in range(3))
    async with anyio.create_task_group() as tg:
        for request in (refused_first, *in_flight):
            tg.start_soon(request.run)
        await until(lambda: limiter.in_flight == 3)
        refused_first.reply(1.0)
        await until(lambda: limiter.in_flight == 2)
        assert limiter.current_rate == 5.0  # nothing learnt yet: halved
        for request in in_flight[:refused_too]:
            request.reply(1.0)
        await until(lambda: limiter.in_flight == 2 - refused_too)
        after = Request(limiter, clock)
        tg.start_soon(after.run)
        await until(lambda: clock.sleepers == 1)
        assert clock.next_deadline == pytest.approx(1.0 + first_grant_after)
        clock.advance_to_next_deadline()
        await until(lambda: after.granted_at is not None)
        for request in (*in_flight[refused_too:], after):
            request.reply("ok")


# -- the policy, as pure functions ---------------------------------------------------------------


@dataclass
class Observation:
    gap: float  # seconds since the previous request
    resumption: bool  # the limiter would mark this grant as sent after a silence


observations = st.lists(
    st.builds(
        Observation,
        gap=st.one_of(st.just(0.0), st.floats(0.0, 2.0)),
        resumption=st.booleans(),
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(
    true_rate=st.floats(0.1, 50.0),
    account_burst=st.integers(1, 10),
    extra_burst=st.integers(0, 5),
    requests=observations,
)
def test_every_estimate_is_a_lower_bound_of_the_account_rate(
    true_rate: float, account_burst: int, extra_burst: int, requests: list[Observation]
) -> None:
    """With answers at once, whatever the pattern of requests, no estimate exceeds the
    account's rate (given that its burst is no larger than ours)."""
    burst = account_burst + extra_burst
    account = TokenBucket(rate=true_rate, burst=account_burst)
    state = RateState.initial(configured=1000.0, floor=0.1)
    now = 0.0
    for number, request in enumerate(requests):
        now += request.gap
        if request.resumption:
            state = state.after_resumption(now, grant=number, burst=burst)
        if account.try_take(now):
            state = state.after_answer(number, granted_at=now)
        else:
            state = state.after_overrun(now, next_grant=number + 1)
        for mark in (*state.overruns, *state.resumptions):
            bound = mark.lower_bound()
            if bound is not None:
                assert Fraction(bound) <= Fraction(true_rate) * (1 + 1e-9) + Fraction(1e-9)
        estimate = state.estimate()
        assert estimate is None or estimate <= true_rate * (1 + 1e-9) + 1e-9


def _mark(at: float, first: int, tokens: float, accepted: int, span: float) -> Mark:
    return Mark(at, first, tokens, accepted, at + span if accepted else None)


states = st.builds(
    RateState,
    configured=st.just(100.0),
    floor=st.just(1.0),
    rate=st.floats(1.0, 100.0),
    overruns=st.lists(
        st.builds(
            lambda at, first, accepted, span: _mark(at, first, 1.0, accepted, span),
            st.floats(0.0, 100.0),
            st.integers(0, 50),
            st.integers(0, 100),
            st.floats(0.0, 50.0),
        ),
        max_size=8,
    ).map(tuple),
)


@given(state=states, now=st.floats(0.0, 200.0))
def test_a_429_never_raises_the_rate_and_lands_under_what_was_learnt(
    state: RateState, now: float
) -> None:
    after = state.after_overrun(now, next_grant=1000)
    assert after.floor <= after.rate <= max(state.rate, after.floor)
    estimate = state.estimate()
    if estimate is None:
        assert after.rate == max(after.floor, state.rate / 2)
    else:
        assert after.learnt is not None
        assert after.learnt <= estimate
        assert after.rate == pytest.approx(max(after.floor, MARGIN * min(estimate, state.rate)))
    assert after.overruns[-1].at == now


@given(
    state=states,
    steps=st.lists(st.tuples(st.floats(0.0, 5.0), st.booleans()), max_size=50),
    recovery_seconds=st.floats(0.1, 100.0),
)
def test_successes_raise_the_rate_slowly_and_never_above_the_configured_rate(
    state: RateState, steps: list[tuple[float, bool]], recovery_seconds: float
) -> None:
    growth = PROBE_GROWTH / recovery_seconds
    now = 0.0
    for gap, saturated in steps:
        now += gap
        after = state.after_success(now, saturated=saturated, growth_per_second=growth)
        assert state.rate <= after.rate <= state.configured
        if not saturated or state.probed_at is None:
            assert after.rate == state.rate
        else:
            counted = min(1.0, max(0.0, now - state.probed_at))
            assert after.rate <= state.rate * (1 + growth * counted) * (1 + 1e-12)
        state = after


@given(
    state=states,
    configured=st.floats(1.0, 200.0),
)
def test_a_reload_keeps_what_was_learnt(state: RateState, configured: float) -> None:
    after = state.reconfigured(configured=configured, floor=configured / 100)
    assert after.rate <= configured
    if state.rate < state.configured:
        assert after.rate == min(configured, max(configured / 100, state.rate))
    else:
        assert after.rate == configured
    assert after.overruns == state.overruns
    assert math.isfinite(after.rate)
