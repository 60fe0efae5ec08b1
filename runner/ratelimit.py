"""One rate limiter for every request the runner sends to bem.

bem enforces a token bucket per account (``rate`` tokens per second, ``burst`` capacity), so the
limiter is that same bucket plus a cap on requests in flight. A request waits for a concurrency
slot and a token; waiting requests of different kinds ("submit", "poll", ...) are served in turn
so neither starves the other, and in arrival order within a kind.

The bucket is kept in exact rational arithmetic, and every wait is rounded up to the next float,
so float rounding can never let it grant a token the ideal bucket does not have yet.

A 429 pauses every grant until its ``Retry-After`` has passed, empties the bucket (which stays
empty through the pause) and halves the rate once per pause (down to a floor); successes then
bring the rate back up linearly over ``recovery_seconds``.

No background task: the waiters themselves do the work. At most one waiter at a time (the
"timekeeper") sleeps on the clock until the next token or the end of a pause; the others wait on
their own event, which is set when they are granted a slot or must take over the timekeeping.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import anyio

from runner.clock import Clock

DEFAULT_RETRY_AFTER = 5.0
"""Pause after a 429 that came without a usable ``Retry-After``, in seconds."""

_DECREASE_FACTOR = 0.5
_MIN_SLEEP = 1e-6  # a timekeeper never sleeps for less, so rounding cannot make it spin


class TokenBucket:
    """A token bucket (``burst`` capacity, refilled at ``rate`` per second), full when first used.

    Kept in exact rational arithmetic, so it never holds a token that the ideal bucket would not
    hold, however long it runs. A server-side bucket built from this class with the same limits
    and read with the same clock never refuses a request the limiter let through.
    """

    def __init__(self, *, rate: float, burst: int) -> None:
        self._rate = Fraction(rate)
        self._burst = Fraction(burst)
        self._tokens = Fraction(burst)
        self._stamp: Fraction | None = None

    def try_take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(Fraction(now))
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def give_back(self) -> None:
        """Return a token that was taken but not used."""
        self._tokens = min(self._burst, self._tokens + 1)

    def empty(self, now: float, *, until: float | None = None) -> None:
        """No token now, and none accrues before ``until`` (the end of a 429 pause)."""
        self._refill(Fraction(now))
        self._tokens = Fraction(0)
        if until is not None and self._stamp is not None and Fraction(until) > self._stamp:
            self._stamp = Fraction(until)

    def wait_time(self, now: float) -> float:
        """Seconds until a whole token is there (0 if one is), such that the float ``now + d``
        is not before the exact moment the token arrives (and, for a clock reading >= 0, at most
        one float step after it)."""
        exact_now = Fraction(now)
        self._refill(exact_now)
        if self._tokens >= 1:
            return 0.0
        start = max(exact_now, self._stamp) if self._stamp is not None else exact_now
        return _float_delay(now, start + (1 - self._tokens) / self._rate)

    def set_rate(self, now: float, rate: float) -> None:
        self._refill(Fraction(now))
        self._rate = Fraction(rate)

    def set_burst(self, now: float, burst: int) -> None:
        self._refill(Fraction(now))
        self._burst = Fraction(burst)
        self._tokens = min(self._tokens, self._burst)

    def _refill(self, now: Fraction) -> None:
        if self._stamp is not None and now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        if self._stamp is None or now > self._stamp:
            self._stamp = now


@dataclass(eq=False)
class _Waiter:
    kind: str
    granted: bool = False
    wake: anyio.Event = field(default_factory=anyio.Event)


class RateLimiter:
    """Slots for requests to bem: at most ``max_concurrency`` at once, and no more than the
    ``rate``/``burst`` token bucket allows; slows down on 429s and recovers on successes."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_concurrency: int,
        clock: Clock,
        min_rate_fraction: float = 0.1,
        recovery_seconds: float = 30.0,
    ) -> None:
        _check_limits(rate=rate, burst=burst, max_concurrency=max_concurrency)
        if not 0 < min_rate_fraction <= 1:
            raise ValueError(f"min_rate_fraction must be in (0, 1], not {min_rate_fraction!r}")
        if not (recovery_seconds > 0 and math.isfinite(recovery_seconds)):
            raise ValueError(f"recovery_seconds must be positive, not {recovery_seconds!r}")
        self._clock = clock
        self._configured_rate = float(rate)
        self._current_rate = float(rate)
        self._min_rate_fraction = min_rate_fraction
        self._recovery_seconds = recovery_seconds
        self._max_concurrency = max_concurrency
        self._bucket = TokenBucket(rate=rate, burst=burst)
        self._paused_until: float | None = None
        self._recover_from: float | None = None  # when the rate last moved towards its target
        self._in_flight = 0
        self._queues: dict[str, deque[_Waiter]] = {}
        self._turns: deque[str] = deque()  # kinds with waiters, next to be served first
        self._timekeeper: _Waiter | None = None
        self._timer: anyio.CancelScope | None = None

    # -- public interface ------------------------------------------------------------------------

    @property
    def current_rate(self) -> float:
        return self._current_rate

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return sum(len(queue) for queue in self._queues.values())

    @property
    def paused_until(self) -> float | None:
        """The end of the current 429 pause (clock time), or None when not paused."""
        if self._paused_until is None or self._paused_until <= self._clock.now():
            return None
        return self._paused_until

    @asynccontextmanager
    async def slot(self, kind: str = "default") -> AsyncIterator[None]:
        """Hold one request slot: a concurrency slot and one token of the rate limit."""
        await self._acquire(kind)
        try:
            yield
        finally:
            self._in_flight -= 1
            self._kick()

    def on_rate_limited(self, retry_after: float | None) -> None:
        """bem answered 429: pause, empty the bucket and slow down."""
        now = self._clock.now()
        if retry_after is None or not math.isfinite(retry_after):
            retry_after = DEFAULT_RETRY_AFTER
        until = now + max(0.0, retry_after)
        # the requests already in flight when the pause began come back 429 too: they are the
        # same overrun, so the rate is cut once per pause, not once per answer
        already_paused = self._paused_until is not None and now < self._paused_until
        if self._paused_until is None or until > self._paused_until:
            self._paused_until = until
        self._recover_from = self._paused_until
        if not already_paused:
            self._set_rate(now, max(self._rate_floor(), self._current_rate * _DECREASE_FACTOR))
        # bem's bucket refills during the pause for the requests bem saw; ours must not, or the
        # end of every pause would release a whole burst at once
        self._bucket.empty(now, until=self._paused_until)
        self._kick()

    def on_success(self) -> None:
        """A request went through: creep back towards the configured rate."""
        if self._current_rate >= self._configured_rate:
            return
        now = self._clock.now()
        since = self._recover_from
        if since is None or now <= since:  # still paused, or no time has passed since last step
            self._recover_from = now if since is None else since
            return
        step = (self._configured_rate - self._rate_floor()) * (now - since) / self._recovery_seconds
        self._recover_from = now
        self._set_rate(now, min(self._configured_rate, self._current_rate + step))
        self._kick(reschedule=True)

    def reconfigure(self, *, rate: float, burst: int, max_concurrency: int) -> None:
        """Apply new limits; a rate that is currently reduced stays reduced in proportion."""
        _check_limits(rate=rate, burst=burst, max_concurrency=max_concurrency)
        now = self._clock.now()
        fraction = self._current_rate / self._configured_rate
        self._configured_rate = float(rate)
        self._set_rate(now, max(self._rate_floor(), min(rate, rate * fraction)))
        self._bucket.set_burst(now, burst)
        self._max_concurrency = max_concurrency
        self._kick(reschedule=True)

    # -- waiting ---------------------------------------------------------------------------------

    async def _acquire(self, kind: str) -> None:
        waiter = _Waiter(kind)
        self._enqueue(waiter)
        try:
            while True:
                self._dispatch()
                if waiter.granted:
                    break
                await self._wait(waiter)
        except BaseException:
            self._withdraw(waiter)
            raise
        self._kick()  # if this waiter was keeping time, another one must take over

    async def _wait(self, waiter: _Waiter) -> None:
        delay = self._seconds_until_grantable()
        if delay is None or self._timekeeper is not None:
            await waiter.wake.wait()
            waiter.wake = anyio.Event()
            return
        self._timekeeper = waiter
        try:
            with anyio.CancelScope() as timer:
                self._timer = timer
                await self._clock.sleep(delay)
        finally:
            self._timekeeper = None
            self._timer = None

    def _seconds_until_grantable(self) -> float | None:
        """How long until a token is due and no pause is on; None if waiting for a free slot."""
        if self._in_flight >= self._max_concurrency:
            return None
        now = self._clock.now()
        delay = self._bucket.wait_time(now)
        if self._paused_until is not None:
            delay = max(delay, _float_delay(now, Fraction(self._paused_until)))
        return max(_MIN_SLEEP, delay)

    def _withdraw(self, waiter: _Waiter) -> None:
        """A waiter was cancelled: it takes no token and holds no slot."""
        if waiter.granted:
            self._in_flight -= 1
            self._bucket.give_back()
        else:
            queue = self._queues[waiter.kind]
            queue.remove(waiter)
            if not queue:
                del self._queues[waiter.kind]
                self._turns.remove(waiter.kind)
        self._kick()

    # -- granting --------------------------------------------------------------------------------

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.kind)
        if queue is None:
            queue = self._queues[waiter.kind] = deque()
            self._turns.append(waiter.kind)
        queue.append(waiter)

    def _dispatch(self) -> None:
        """Grant slots to waiters, kind by kind in turn, while limits allow."""
        now = self._clock.now()
        if self._paused_until is not None and now < self._paused_until:
            return
        while self._turns and self._in_flight < self._max_concurrency:
            if not self._bucket.try_take(now):
                return
            kind = self._turns.popleft()
            queue = self._queues[kind]
            waiter = queue.popleft()
            if queue:
                self._turns.append(kind)
            else:
                del self._queues[kind]
            self._in_flight += 1
            waiter.granted = True
            waiter.wake.set()
            if waiter is self._timekeeper and self._timer is not None:
                self._timer.cancel()

    def _kick(self, *, reschedule: bool = False) -> None:
        """Grant what can be granted now and make sure someone keeps time for the rest."""
        self._dispatch()
        if not self._turns:
            return
        if self._timekeeper is None:
            self._queues[self._turns[0]][0].wake.set()
        elif reschedule and self._timer is not None:
            self._timer.cancel()

    # -- rate ------------------------------------------------------------------------------------

    def _rate_floor(self) -> float:
        return self._configured_rate * self._min_rate_fraction

    def _set_rate(self, now: float, rate: float) -> None:
        self._current_rate = rate
        self._bucket.set_rate(now, rate)


def _check_limits(*, rate: float, burst: int, max_concurrency: int) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number, not {rate!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be a whole number >= 1, not {burst!r}")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise ValueError(f"max_concurrency must be a whole number >= 1, not {max_concurrency!r}")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be a whole number >= 1, not {max_concurrency!r}")


def _float_delay(now: float, due: Fraction) -> float:
    """A delay after which the float ``now + delay`` is not before ``due``, and barely so."""
    target = float(due)
    if Fraction(target) < due:
        target = math.nextafter(target, math.inf)
    delay = target - now  # exact whenever target and now are close (Sterbenz)
    while now + delay < target:  # otherwise a step or two of rounding to make up
        delay = math.nextafter(delay, math.inf)
    return delay
