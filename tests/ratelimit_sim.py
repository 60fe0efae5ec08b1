"""A deterministic account for the rate limiter to run against: bem's token bucket (the
emulator's own), its ``Retry-After`` values, and requests that take time on the way there and
back, all on one :class:`~runner.clock.FakeClock`.

Each request takes a slot of the real :class:`~runner.ratelimit.RateLimiter`, travels to the
account, is accepted or refused by its bucket at arrival, travels back, and reports the answer to
the limiter as the API client does (``on_rate_limited(retry_after_seconds(...))`` or
``on_success()``) before leaving the slot. A refused request is sent again, as the client's
retries do, until accepted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.lowlevel
import httpx

from runner.api.failures import retry_after_seconds
from runner.clock import FakeClock
from runner.emulator.faults import TokenBucket, retry_after
from runner.ratelimit import RateLimiter

RetryAfterStyle = Literal["seconds", "http-date", "absent"]


@dataclass(frozen=True)
class Account:
    """What bem allows and how it answers."""

    rate: float
    burst: int = 10
    retry_after: RetryAfterStyle = "seconds"


@dataclass(frozen=True)
class Runner:
    """How the runner is configured and how it uses the API."""

    rate: float
    burst: int = 9
    max_concurrency: int = 8
    workers: int = 32
    latency: tuple[float, float] = (0.05, 0.3)
    """Round-trip time of a request, uniformly in this range (half each way)."""


@dataclass
class Sent:
    at: float  # when it reached the account
    refused: bool


@dataclass
class Run:
    sent: list[Sent] = field(default_factory=list)
    early: int = 0
    """Requests sent after a 429 had come back and before the ``Retry-After`` it gave passed.
    A request is timed when its task runs, which is before the clock moves again, so one sent
    later than a 429 was heard is caught; one sent at the very instant is not (the order of
    the two is not seen from outside the limiter)."""

    @property
    def refused(self) -> int:
        return sum(s.refused for s in self.sent)

    def halves(self) -> tuple[list[Sent], list[Sent]]:
        middle = len(self.sent) // 2
        return self.sent[:middle], self.sent[middle:]

    def accepted_rate(self, sent: list[Sent]) -> float:
        """Accepted requests per second over the span of ``sent``."""
        span = sent[-1].at - sent[0].at
        return sum(not s.refused for s in sent) / span if span > 0 else float("inf")


async def run(account: Account, runner: Runner, *, requests: int, seed: int = 0) -> Run:
    """Send ``requests`` requests (each until accepted) through a fresh limiter."""
    clock = FakeClock(1000.0, wall_start=1_700_000_000.25)
    limiter = RateLimiter(
        rate=runner.rate,
        burst=runner.burst,
        max_concurrency=runner.max_concurrency,
        clock=clock,
    )
    bucket = TokenBucket(account.rate, account.burst, clock.now())
    dice = random.Random(seed)
    result = Run()
    heard: list[tuple[float, float]] = []  # (when a 429 came back, until when it forbids)
    remaining = requests
    working = 0  # workers not finished
    travelling = 0  # requests on their way to the account or back

    async def travel() -> None:
        nonlocal travelling
        travelling += 1
        try:
            await clock.sleep(dice.uniform(*runner.latency) / 2)
        finally:
            travelling -= 1

    async def send() -> bool:
        """One attempt; True when accepted."""
        async with limiter.slot("poll" if dice.random() < 0.7 else "submit"):
            now = clock.now()
            result.early += any(at < now < until for at, until in heard)
            await travel()
            wait = bucket.take(clock.now())
            result.sent.append(Sent(clock.now(), refused=wait > 0))
            headers = httpx.Headers()
            if wait > 0 and account.retry_after != "absent":
                headers.update(retry_after(wait, account.retry_after, clock.wall()))
            await travel()
            if wait > 0:
                told = retry_after_seconds(headers, now=clock.wall())
                heard.append((clock.now(), clock.now() + (told or 0.0)))
                limiter.on_rate_limited(told)
                return False
            limiter.on_success()
            return True

    async def worker() -> None:
        nonlocal remaining, working
        working += 1
        try:
            while remaining > 0:
                remaining -= 1
                while not await send():
                    pass
        finally:
            working -= 1

    def quiet() -> bool:
        """Every worker waits: travelling (asleep on the clock) or for a slot, and one waiter
        keeps time for the limiter if anyone waits for a token."""
        timekeeper = limiter.waiting > 0 and limiter.in_flight < runner.max_concurrency
        return working == travelling + limiter.waiting and clock.sleepers == travelling + timekeeper

    async with anyio.create_task_group() as tasks:
        for _ in range(runner.workers):
            tasks.start_soon(worker)
        await anyio.lowlevel.checkpoint()
        while working:
            for _ in range(10_000):
                if quiet():
                    break
                await anyio.lowlevel.checkpoint()
            else:
                raise AssertionError("the requests never settled")
            if working:
                assert clock.advance_to_next_deadline() is not None, "stuck, nothing to wait for"
    assert limiter.in_flight == 0
    assert limiter.waiting == 0
    return result
