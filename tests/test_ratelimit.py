from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.bucket import TokenBucket
from runner.clock import FakeClock
from runner.ratelimit import DEFAULT_RETRY_AFTER, RateLimiter, grants_together


async def until(condition: Callable[[], bool], *, turns: int = 1000) -> None:
    """Let other tasks run until ``condition`` holds; fail (instead of hanging) if it never does."""
    for _ in range(turns):
        if condition():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition never became true")


async def drive(clock: FakeClock, finished: Callable[[], bool]) -> None:
    """Move the clock from one deadline to the next (the limiter's timekeeper sleeps until the
    next token is due) until ``finished()``."""
    while True:
        await until(lambda: finished() or clock.sleepers == 1)
        if finished():
            return
        clock.advance_to_next_deadline()


class CountingClock:
    """A FakeClock that counts how often it is read and slept on."""

    def __init__(self, inner: FakeClock) -> None:
        self.inner = inner
        self.reads = 0
        self.sleeps = 0

    def now(self) -> float:
        self.reads += 1
        return self.inner.now()

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        await self.inner.sleep(seconds)

    def wall(self) -> float:
        self.reads += 1
        return self.inner.wall()

    async def wait(self, event: anyio.Event, seconds: float) -> bool:
        self.sleeps += 1
        return await self.inner.wait(event, seconds)


@dataclass
class Holder:
    """A task that takes a slot, notes when, and keeps it until released."""

    limiter: RateLimiter
    clock: FakeClock
    kind: str = "default"
    name: str = ""
    granted_at: float | None = None
    done: bool = False
    release: anyio.Event = field(default_factory=anyio.Event)
    log: list[str] | None = None

    async def run(self) -> None:
        async with self.limiter.slot(self.kind):
            self.granted_at = self.clock.now()
            if self.log is not None:
                self.log.append(self.name)
            await self.release.wait()
        self.done = True


def make(
    clock: FakeClock, *, rate: float = 10.0, burst: int = 1, max_concurrency: int = 100
) -> RateLimiter:
    return RateLimiter(rate=rate, burst=burst, max_concurrency=max_concurrency, clock=clock)


# -- construction ------------------------------------------------------------------------------


def test_constructor_has_no_side_effects() -> None:
    clock = CountingClock(FakeClock())
    limiter = RateLimiter(rate=10, burst=5, max_concurrency=2, clock=clock)
    assert (clock.reads, clock.sleeps) == (0, 0)
    assert limiter.current_rate == 10.0
    assert limiter.in_flight == 0
    assert limiter.waiting == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0}, "rate"),
        ({"rate": -1.0}, "rate"),
        ({"rate": float("inf")}, "rate"),
        ({"rate": float("nan")}, "rate"),
        ({"burst": 0}, "burst"),
        ({"burst": 1.5}, "burst"),
        ({"burst": True}, "burst"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 2.0}, "max_concurrency"),
        ({"min_rate_fraction": 0.0}, "min_rate_fraction"),
        ({"min_rate_fraction": 1.5}, "min_rate_fraction"),
        ({"recovery_seconds": 0.0}, "recovery_seconds"),
    ],
)
def test_constructor_rejects_bad_limits(kwargs: dict[str, float], message: str) -> None:
    values: dict[str, float] = {"rate": 10.0, "burst": 5, "max_concurrency": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        RateLimiter(clock=FakeClock(), **values)  # type: ignore[arg-type]


# -- the bucket --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_starts_full_then_refills_at_the_rate() -> None:
    clock = FakeClock(1000.0)
    limiter = make(clock, rate=10.0, burst=3)
    for _ in range(3):
        async with limiter.slot():
            assert clock.now() == 1000.0
    fourth = Holder(limiter, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(fourth.run)
        await until(lambda: clock.sleepers >= 1)  # the waiter sleeps until the next token is due
        deadline = clock.next_deadline
        assert deadline is not None
        assert 1000.1 <= deadline <= 1000.1 + 1e-6
        clock.advance_to(1000.1 - 1e-6)
        await anyio.lowlevel.checkpoint()
        assert fourth.granted_at is None
        clock.advance_to(deadline)
        await until(lambda: fourth.granted_at is not None)
        fourth.release.set()
    assert fourth.granted_at == deadline


@pytest.mark.anyio
async def test_sustained_demand_is_served_at_the_rate_never_faster() -> None:
    clock = FakeClock()
    rate, burst = 3.0, 4
    limiter = make(clock, rate=rate, burst=burst)
    grants: list[float] = []

    async def worker() -> None:
        async with limiter.slot():
            grants.append(clock.now())

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(worker)
        await drive(clock, lambda: len(grants) == 40)
    assert grants[:burst] == [0.0] * burst
    # then two at a time (half the burst), each pair as soon as its second token exists
    for index, granted in enumerate(grants[burst:]):
        ideal = Fraction(index // 2 * 2 + 2) / Fraction(rate)
        assert Fraction(granted) >= ideal  # never before the token exists
        assert granted - float(ideal) < 1e-6  # and not noticeably later


@given(
    waiting=st.integers(0, 50),
    free_slots=st.integers(-2, 50),
    burst=st.integers(1, 100),
    refused_before=st.booleans(),
)
def test_grants_together_never_more_than_half_a_burst_or_than_wait(
    waiting: int, free_slots: int, burst: int, refused_before: bool
) -> None:
    together = grants_together(
        waiting=waiting, free_slots=free_slots, burst=burst, refused_before=refused_before
    )
    assert together >= 1
    if refused_before:
        assert together == 1
    else:
        assert together == max(1, min(burst // 2, waiting, free_slots))
        assert together <= max(1, burst // 2)


@pytest.mark.anyio
async def test_a_request_granted_with_another_waits_out_the_429_that_came_before_it_went_out() -> (
    None
):
    clock = FakeClock(0.0)
    limiter = make(clock, rate=10.0, burst=4)  # two at a time
    entered: list[tuple[str, float]] = []

    async def refused() -> None:
        async with limiter.slot():
            entered.append(("refused", clock.now()))
            limiter.on_rate_limited(3.0)

    async def other() -> None:
        async with limiter.slot():
            entered.append(("other", clock.now()))

    for _ in range(4):  # the full bucket goes at once
        async with limiter.slot():
            pass
    async with anyio.create_task_group() as tg:
        tg.start_soon(refused)
        tg.start_soon(other)
        await drive(clock, lambda: len(entered) == 2)
    # both granted when the second token came; the 429 came back before the other went out, so
    # it gave its token back and went at the first token after the pause, at the halved rate
    assert [name for name, _ in entered] == ["refused", "other"]
    assert [at for _, at in entered] == [pytest.approx(0.2), pytest.approx(3.4)]


@pytest.mark.anyio
async def test_waiting_never_spins() -> None:
    inner = FakeClock()
    clock = CountingClock(inner)
    limiter = RateLimiter(rate=7.0, burst=1, max_concurrency=1, clock=clock)
    grants = 0

    async def worker() -> None:
        nonlocal grants
        async with limiter.slot():
            grants += 1

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(worker)
        await drive(inner, lambda: grants == 50)
    assert clock.sleeps == 49  # one sleep per token, none wasted


# -- concurrency -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrency_is_capped_and_a_release_wakes_the_next() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=1000.0, burst=10, max_concurrency=2)
    holders = [Holder(limiter, clock) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for holder in holders:
            tg.start_soon(holder.run)
        await until(lambda: limiter.waiting == 1)
        assert limiter.in_flight == 2
        assert [h.granted_at is not None for h in holders] == [True, True, False]
        assert clock.sleepers == 0  # waiting for a slot needs no timer
        holders[0].release.set()
        await until(lambda: holders[2].granted_at is not None)
        assert clock.now() == 0.0
        assert limiter.in_flight == 2
        holders[1].release.set()
        holders[2].release.set()
    assert limiter.in_flight == 0


@pytest.mark.anyio
async def test_a_slot_is_released_when_the_body_raises() -> None:
    clock = FakeClock()
    limiter = make(clock, burst=2, max_concurrency=1)
    with pytest.raises(RuntimeError, match="boom"):
        async with limiter.slot():
            raise RuntimeError("boom")
    assert limiter.in_flight == 0
    async with limiter.slot():
        assert limiter.in_flight == 1


# -- fairness ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_kinds_take_turns_and_each_kind_is_fifo() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=1000.0, burst=100, max_concurrency=1)
    log: list[str] = []
    gate = Holder(limiter, clock, name="gate", log=log)
    names = ["s1", "s2", "s3", "s4", "p1", "p2", "x1"]
    holders = [
        Holder(
            limiter, clock, kind={"s": "submit", "p": "poll", "x": "other"}[n[0]], name=n, log=log
        )
        for n in names
    ]
    async with anyio.create_task_group() as tg:
        tg.start_soon(gate.run)
        await until(lambda: limiter.in_flight == 1)
        for holder in holders:  # queue up one by one, in this order
            tg.start_soon(holder.run)
            await until(lambda: limiter.waiting == holders.index(holder) + 1)  # noqa: B023
        gate.release.set()
        by_name = {holder.name: holder for holder in holders}
        for served in range(1, len(holders) + 1):
            await until(lambda: len(log) == served + 1)  # noqa: B023
            assert limiter.in_flight == 1
            by_name[log[-1]].release.set()
    assert log == ["gate", "s1", "p1", "x1", "s2", "p2", "s3", "s4"]


@pytest.mark.anyio
async def test_a_steady_stream_of_one_kind_cannot_starve_another() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=10.0, burst=1, max_concurrency=10)
    log: list[str] = []

    async def request(kind: str) -> None:
        async with limiter.slot(kind):
            log.append(kind)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(request, "poll")
        await until(lambda: limiter.waiting == 19)
        tg.start_soon(request, "submit")
        await until(lambda: limiter.waiting == 20)
        await drive(clock, lambda: len(log) == 3)
        tg.cancel_scope.cancel()
    assert log == ["poll", "poll", "submit"]


# -- cancellation ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_cancelled_waiter_takes_no_token() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=1.0, burst=1)
    async with limiter.slot():
        pass
    doomed = Holder(limiter, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(doomed.run)
        await until(lambda: clock.sleepers >= 1)
        assert limiter.waiting == 1
        tg.cancel_scope.cancel()
    assert (clock.sleepers, limiter.waiting, limiter.in_flight) == (0, 0, 0)
    assert doomed.granted_at is None
    clock.advance(1.0)
    async with limiter.slot():  # the one token refilled by now is still there
        assert limiter.in_flight == 1


@pytest.mark.anyio
async def test_cancelling_the_timekeeper_hands_the_timer_to_the_next_waiter() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=1.0, burst=1)
    async with limiter.slot():
        pass
    first, second = Holder(limiter, clock), Holder(limiter, clock)
    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as doomed:
            doomed.start_soon(first.run)
            await until(lambda: clock.sleepers >= 1)
            tg.start_soon(second.run)
            await until(lambda: limiter.waiting == 2)
            assert clock.sleepers == 1  # only one waiter watches the clock
            doomed.cancel_scope.cancel()
        await until(lambda: clock.sleepers >= 1)  # the second waiter took over
        assert limiter.waiting == 1
        clock.advance_to_next_deadline()
        await until(lambda: second.granted_at is not None)
        second.release.set()
    assert first.granted_at is None
    assert second.granted_at == pytest.approx(1.0)


@pytest.mark.anyio
async def test_cancelled_after_being_granted_but_before_running_returns_token_and_slot() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=1.0, burst=2, max_concurrency=1)
    late = Holder(limiter, clock)
    async with anyio.create_task_group() as tg:
        async with limiter.slot():  # takes token 1 of 2 and the only slot
            tg.start_soon(late.run)
            await until(lambda: limiter.waiting == 1)
            tg.cancel_scope.cancel()  # reaches `late` while it waits...
        # ...and in the same instant leaving the slot grants it `late` (with token 2)
        assert limiter.waiting == 0
        assert limiter.in_flight == 1
        clock.advance(10.0)  # the bucket refills to its brim before `late` runs...
        limiter.reconfigure(rate=1.0, burst=2, max_concurrency=1)  # ...(a reload looks at it)
    assert limiter.in_flight == 0
    assert late.granted_at is None
    # token 2 came back, yet the bucket holds no more than its burst
    first, second, third = (Holder(limiter, clock) for _ in range(3))
    async with anyio.create_task_group() as tg:
        for holder in (first, second, third):
            tg.start_soon(holder.run)
            holder.release.set()
        await until(lambda: clock.sleepers == 1 or third.granted_at is not None)
        assert (first.done, second.done, third.granted_at) == (True, True, None)
        clock.advance_to_next_deadline()
    assert third.granted_at == pytest.approx(11.0)


# -- 429s --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rate_limited_pauses_everyone_until_retry_after() -> None:
    clock = FakeClock(50.0)
    limiter = make(clock, rate=10.0, burst=5)
    limiter.on_rate_limited(2.0)
    assert limiter.paused_until == 52.0
    assert limiter.current_rate == 5.0
    waiter, latecomer = Holder(limiter, clock), Holder(limiter, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter.run)
        await until(lambda: clock.sleepers >= 1)
        # no token accrues during the pause: the first comes one interval after it ends
        assert clock.next_deadline == pytest.approx(52.2)
        clock.advance_to(51.5)
        tg.start_soon(latecomer.run)
        await until(lambda: limiter.waiting == 2)
        clock.advance_to(52.1)
        await anyio.lowlevel.checkpoint()
        assert (waiter.granted_at, latecomer.granted_at) == (None, None)
        clock.advance_to_next_deadline()
        await until(lambda: waiter.granted_at is not None and clock.sleepers >= 1)
        clock.advance_to_next_deadline()
        await until(lambda: latecomer.granted_at is not None)
        waiter.release.set()
        latecomer.release.set()
    assert waiter.granted_at == pytest.approx(52.2)
    assert latecomer.granted_at == pytest.approx(52.4)
    assert limiter.paused_until is None


@pytest.mark.anyio
async def test_answers_to_requests_already_in_flight_cut_the_rate_once() -> None:
    clock = FakeClock(10.0)
    limiter = make(clock, rate=16.0, burst=4)
    for _ in range(4):  # four requests sent before the first 429 came back
        limiter.on_rate_limited(1.0)
    assert limiter.current_rate == 8.0
    clock.advance_to(11.5)
    limiter.on_rate_limited(1.0)  # a new overrun after the pause: cut again
    assert limiter.current_rate == 4.0


@pytest.mark.anyio
async def test_rate_limited_empties_the_bucket() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=10.0, burst=5)
    limiter.on_rate_limited(0.0)
    waiter = Holder(limiter, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter.run)
        await until(lambda: clock.sleepers >= 1)
        deadline = clock.next_deadline
        assert deadline is not None
        assert 0.2 <= deadline < 0.2 + 1e-6  # one token at the halved rate
        clock.advance_to(deadline)
        await until(lambda: waiter.granted_at is not None)
        waiter.release.set()


@pytest.mark.anyio
async def test_rate_limited_without_retry_after_pauses_a_default_while() -> None:
    clock = FakeClock()
    limiter = make(clock)
    limiter.on_rate_limited(None)
    assert limiter.paused_until == DEFAULT_RETRY_AFTER
    assert 1.0 <= DEFAULT_RETRY_AFTER <= 10.0
    limiter.on_rate_limited(float("nan"))
    assert limiter.paused_until == DEFAULT_RETRY_AFTER


def test_a_long_retry_after_is_honoured_and_a_shorter_one_does_not_cut_it() -> None:
    clock = FakeClock()
    limiter = make(clock)
    limiter.on_rate_limited(3600.0)
    limiter.on_rate_limited(1.0)
    assert limiter.paused_until == 3600.0
    clock.advance(3599.0)
    assert limiter.paused_until == 3600.0
    clock.advance(1.0)
    assert limiter.paused_until is None


def test_a_negative_retry_after_means_no_pause() -> None:
    clock = FakeClock(10.0)
    limiter = make(clock)
    limiter.on_rate_limited(-5.0)
    assert limiter.paused_until is None
    assert limiter.current_rate == 5.0


def test_each_429_halves_the_rate_down_to_the_floor() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=16.0, burst=1, max_concurrency=1, clock=clock, min_rate_fraction=0.1)
    rates = []
    for _ in range(6):
        limiter.on_rate_limited(0.0)
        rates.append(limiter.current_rate)
    assert rates == [8.0, 4.0, 2.0, 1.6, 1.6, 1.6]


@pytest.mark.anyio
async def test_successes_raise_the_rate_slowly_and_only_while_requests_wait_for_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10.0, burst=1, max_concurrency=5, clock=clock, recovery_seconds=10)
    limiter.on_rate_limited(2.0)
    assert limiter.current_rate == 5.0  # no evidence yet: halved
    clock.advance(1.0)
    limiter.on_success()  # still paused: no probing
    clock.advance(2.0)
    limiter.on_success()  # nobody waits: a higher rate would not be used
    assert limiter.current_rate == 5.0
    async with limiter.slot():  # takes the one token
        pass
    waiter = Holder(limiter, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter.run)
        await until(lambda: limiter.waiting == 1)
        clock.advance(0.1)  # the next token is due at 3.2: still waiting
        limiter.on_success()
        # 0.1 s of 1 %/s (a tenth every ten seconds), counted from when requests began to wait
        assert limiter.current_rate == pytest.approx(5.0 * 1.001)
        clock.advance(0.1)
        await until(lambda: waiter.granted_at is not None)
        clock.advance(30.0)
        limiter.on_success()  # nobody waits any more
        assert limiter.current_rate == pytest.approx(5.0 * 1.001)
        waiter.release.set()


def test_success_at_full_rate_changes_nothing() -> None:
    clock = FakeClock()
    limiter = make(clock)
    clock.advance(5.0)
    limiter.on_success()
    assert limiter.current_rate == 10.0


@pytest.mark.anyio
async def test_a_higher_rate_wakes_the_timekeeper_early() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        rate=10.0,
        burst=1,
        max_concurrency=5,
        clock=clock,
        min_rate_fraction=0.1,
        recovery_seconds=0.01,  # grows by half of itself in 0.05 s: easy to see
    )
    for _ in range(10):
        limiter.on_rate_limited(0.0)  # down to the floor of 1/s, bucket empty
    assert limiter.current_rate == 1.0
    waiter = Holder(limiter, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter.run)
        await until(lambda: clock.sleepers >= 1)
        assert clock.next_deadline == pytest.approx(1.0)
        limiter.on_success()  # requests wait from now on
        clock.advance(0.05)
        limiter.on_success()  # 1/s * (1 + 10/s * 0.05 s) = 1.5/s
        assert limiter.current_rate == pytest.approx(1.5)
        # the timekeeper wakes up and sleeps again, until the token now due sooner
        await until(lambda: (clock.next_deadline or 1.0) < 1.0)
        deadline = clock.next_deadline
        assert deadline is not None
        assert deadline == pytest.approx(0.05 + 0.95 / 1.5)
        assert clock.sleepers == 1
        clock.advance_to(deadline)
        await until(lambda: waiter.granted_at is not None)
        waiter.release.set()


# -- reconfigure -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_reconfigure_raises_concurrency_and_lets_waiters_in() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=100.0, burst=5, max_concurrency=1)
    holders = [Holder(limiter, clock) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for holder in holders:
            tg.start_soon(holder.run)
        await until(lambda: limiter.waiting == 2)
        limiter.reconfigure(rate=100.0, burst=5, max_concurrency=3)
        await until(lambda: all(h.granted_at is not None for h in holders))
        assert limiter.in_flight == 3
        for holder in holders:
            holder.release.set()


@pytest.mark.anyio
async def test_reconfigure_shrinks_the_bucket_and_keeps_a_learnt_rate() -> None:
    clock = FakeClock()
    limiter = make(clock, rate=10.0, burst=10)
    limiter.on_rate_limited(0.0)
    assert limiter.current_rate == 5.0
    limiter.reconfigure(rate=20.0, burst=2, max_concurrency=4)
    assert limiter.current_rate == 5.0  # the account did not get faster: still 5/s
    clock.advance(60.0)  # refills to the new burst, not the old one
    granted = 0
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            holder = Holder(limiter, clock)
            tg.start_soon(holder.run)
            holder.release.set()
        await until(lambda: limiter.waiting == 1)
        granted = 3 - limiter.waiting
        tg.cancel_scope.cancel()
    assert granted == 2
    limiter.reconfigure(rate=3.0, burst=2, max_concurrency=4)
    assert limiter.current_rate == 3.0  # a configuration below it wins


def test_reconfigure_at_full_rate_moves_to_the_new_rate() -> None:
    limiter = make(FakeClock(), rate=10.0)
    limiter.reconfigure(rate=25.0, burst=3, max_concurrency=2)
    assert limiter.current_rate == 25.0
    with pytest.raises(ValueError, match="rate"):
        limiter.reconfigure(rate=0.0, burst=3, max_concurrency=2)
    assert limiter.current_rate == 25.0


# -- the token bucket on its own --------------------------------------------------------------


def test_token_bucket_basics() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.try_take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(100.0) == 0.5
    assert not bucket.try_take(100.25)
    assert bucket.wait_time(100.25) == 0.25
    assert bucket.try_take(100.5)
    bucket.give_back()
    assert bucket.try_take(100.5)
    bucket.give_back()
    bucket.give_back()  # more than was taken: still capped at the burst
    bucket.give_back()
    bucket.give_back()
    assert [bucket.try_take(100.5) for _ in range(4)] == [True, True, True, False]
    bucket.set_rate(100.5, 4.0)
    assert bucket.wait_time(100.5) == 0.25
    bucket.set_burst(1000.0, 1)
    assert [bucket.try_take(1000.0) for _ in range(2)] == [True, False]
    bucket.empty(2000.0)
    assert bucket.wait_time(2000.0) == 0.25


@given(
    start=st.floats(min_value=0.0, max_value=1e7),
    rate=st.floats(min_value=0.01, max_value=1e4),
    burst=st.integers(1, 5),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.0), st.integers(1, 5)),
        min_size=1,
        max_size=20,
    ),
)
def test_token_bucket_wait_time_is_exactly_enough(
    start: float, rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now = start
    for step, wanted in steps:
        tokens = min(wanted, burst)
        now += step
        while bucket.try_take(now):
            pass
        delay = bucket.wait_time(now, tokens)
        assert delay > 0
        due = now + delay
        # float rounding may overshoot the exact moment, but by no more than one step
        earlier = math.nextafter(math.nextafter(due, -math.inf), -math.inf)
        if earlier > now:
            assert not bucket.holds(earlier, tokens)  # not before ...
        assert bucket.holds(due, tokens)  # ... but then, there they are
        for _ in range(tokens):
            assert bucket.try_take(due)
        now = due


# -- the bound, under any interleaving ---------------------------------------------------------


@dataclass
class Scenario:
    rate: float
    burst: int
    max_concurrency: int
    steps: list[tuple[str, float]]


step = st.one_of(
    st.tuples(st.just("spawn_submit"), st.sampled_from([0.0, 0.05, 0.3, 1.0])),
    st.tuples(st.just("spawn_poll"), st.sampled_from([0.0, 0.05, 0.3, 1.0])),
    st.tuples(st.just("crowd"), st.integers(2, 12).map(float)),
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=1.5)),
    st.tuples(st.just("next_deadline"), st.just(0.0)),
    st.tuples(st.just("yield"), st.integers(1, 4).map(float)),
    st.tuples(st.just("429"), st.sampled_from([-1.0, 0.0, 0.01, 0.5, 2.0])),
    st.tuples(st.just("success"), st.just(0.0)),
    st.tuples(st.just("cancel"), st.integers(0, 50).map(float)),
    st.tuples(st.just("reconfigure"), st.floats(min_value=0.2, max_value=1.0)),
)
scenarios = st.builds(
    Scenario,
    rate=st.sampled_from([0.7, 1.0, 3.0, 10.0, 100.0 / 3.0, 0.1 + 0.2]),
    burst=st.integers(1, 5),
    max_concurrency=st.integers(1, 4),
    steps=st.lists(step, min_size=3, max_size=60),
)


async def play(scenario: Scenario) -> tuple[list[float], int, int]:
    """Run a scenario; returns grant times, the most slots ever held at once, and how many
    requests were cancelled before getting a slot."""
    clock = FakeClock(1000.0)
    limiter = RateLimiter(
        rate=scenario.rate,
        burst=scenario.burst,
        max_concurrency=scenario.max_concurrency,
        clock=clock,
    )
    server = TokenBucket(rate=scenario.rate, burst=scenario.burst)
    grants: list[float] = []
    scopes: list[anyio.CancelScope] = []
    holding = 0
    most_holding = 0
    unserved = 0
    outstanding = 0

    async def request(kind: str, hold: float, scope: anyio.CancelScope) -> None:
        nonlocal holding, most_holding, unserved, outstanding
        got_slot = False
        with scope:
            async with limiter.slot(kind):
                got_slot = True
                grants.append(clock.now())
                assert server.try_take(clock.now()), "the server's own bucket would refuse this"
                holding += 1
                most_holding = max(most_holding, holding)
                try:
                    await clock.sleep(hold)
                finally:
                    holding -= 1
                    limiter.on_success()
        unserved += not got_slot
        outstanding -= 1

    async def every_grant_taken_up() -> None:
        # A request is timed when its task runs, so time must not move between the grant and
        # then; otherwise the record would show it later than the limiter let it go.
        await until(lambda: limiter.in_flight == holding)

    async with anyio.create_task_group() as tg:
        for action, value in scenario.steps:
            if action.startswith("spawn"):
                scope = anyio.CancelScope()
                scopes.append(scope)
                outstanding += 1
                tg.start_soon(request, action.removeprefix("spawn_"), value, scope)
            elif action == "crowd":  # many short requests of both kinds at once
                for number in range(int(value)):
                    scope = anyio.CancelScope()
                    scopes.append(scope)
                    outstanding += 1
                    kind = "submit" if number % 3 == 0 else "poll"
                    tg.start_soon(request, kind, 0.0, scope)
            elif action == "advance":
                await every_grant_taken_up()
                clock.advance(value)
            elif action == "next_deadline":
                await every_grant_taken_up()
                clock.advance_to_next_deadline()
            elif action == "yield":
                for _ in range(int(value)):
                    await anyio.lowlevel.checkpoint()
            elif action == "429":
                limiter.on_rate_limited(value)
            elif action == "success":
                limiter.on_success()
            elif action == "cancel" and scopes:
                scopes[int(value) % len(scopes)].cancel()
            elif action == "reconfigure":
                limiter.reconfigure(
                    rate=scenario.rate * value,
                    burst=max(1, round(scenario.burst * value)),
                    max_concurrency=max(1, round(scenario.max_concurrency * value)),
                )
        # Everything still waiting must get its slot in the end: drive time until it has.
        for _ in range(5_000):
            if outstanding == 0:
                break
            await anyio.lowlevel.checkpoint()
            if clock.sleepers:
                await every_grant_taken_up()
                clock.advance_to_next_deadline()
        assert outstanding == 0, "a request never got its slot"
    assert limiter.in_flight == 0
    assert limiter.waiting == 0
    assert clock.sleepers == 0
    return grants, most_holding, unserved


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_never_more_than_burst_plus_rate_times_window(scenario: Scenario) -> None:
    grants, most_holding, _ = anyio.run(play, scenario, backend="asyncio")
    assert most_holding <= scenario.max_concurrency
    assert grants == sorted(grants)
    rate, burst = Fraction(scenario.rate), scenario.burst
    for first in range(len(grants)):
        for last in range(first, len(grants)):
            window = Fraction(grants[last]) - Fraction(grants[first])
            assert last - first + 1 <= burst + rate * window, (first, last, grants)


@settings(max_examples=40, deadline=None)
@given(
    rate=st.sampled_from([0.3, 1.0, 7.0, 10.0, 1000.0 / 7.0]),
    burst=st.integers(1, 10),
    requests=st.integers(1, 80),
)
def test_under_pure_contention_grants_follow_the_bucket_exactly(
    rate: float, burst: int, requests: int
) -> None:
    async def main() -> list[float]:
        clock = FakeClock(12345.678)
        limiter = RateLimiter(rate=rate, burst=burst, max_concurrency=1000, clock=clock)
        grants: list[float] = []

        async def request() -> None:
            async with limiter.slot():
                grants.append(clock.now())

        async with anyio.create_task_group() as tg:
            for _ in range(requests):
                tg.start_soon(request)
            await drive(clock, lambda: len(grants) == requests)
        return grants

    grants = anyio.run(main, backend="asyncio")
    start = Fraction(12345.678)
    for granted, tokens in zip(grants, tokens_before_each_grant(requests, burst), strict=True):
        ideal = start + Fraction(tokens) / Fraction(rate)
        assert Fraction(granted) >= ideal
        assert granted - float(ideal) < 1e-5


def tokens_before_each_grant(requests: int, burst: int) -> list[int]:
    """Under pure contention: a full bucket's worth at once, then requests in groups of half a
    burst (fewer when fewer are left), each group when its last token has accrued."""
    accrued = [0] * min(requests, burst)
    gathered = 0
    while len(accrued) < requests:
        together = max(1, min(burst // 2, requests - len(accrued)))
        gathered += together
        accrued += [gathered] * together
    return accrued
