"""One rate limiter for every request the runner sends to bem.

bem enforces a token bucket per account (``rate`` tokens per second, ``burst`` capacity), so the
limiter is that same bucket plus a cap on requests in flight. A request waits for a concurrency
slot and a token; waiting requests of different kinds ("submit", "poll", ...) are served in turn
so neither starves the other, and in arrival order within a kind.

The bucket is kept in exact (dyadic rational) arithmetic, and every wait is rounded up to the
next float, so float rounding can never let it grant a token the ideal bucket does not have yet.

**Learning the account's rate.** The configured rate may be more than the account allows. A 429
pauses every grant until its ``Retry-After`` has passed, and the limiter then runs just below
what the account was seen to accept (:class:`RateState`, pure, apart from the waiting below):

- *Evidence.* At a 429 the account's bucket is (nearly) empty; when sending resumes after a
  silence (the end of a pause, or nothing in flight and our bucket full) it holds at most a
  burst (bem's burst is taken to be no larger than ours). From such a moment ``m`` on, the
  account accepted ``A`` of the requests granted, the last of them ``T`` seconds after ``m``,
  so its rate is at least ``(A - tokens_at_m) / T``. The best of these lower bounds over the
  last few such moments, among those resting on ``MIN_EVIDENCE`` requests or more, is the
  estimate (one resting on less is mostly noise).
- *Decrease.* At a 429 the rate drops to ``MARGIN`` times the lower of that estimate and the
  current rate; with no estimate yet it is halved. Never below ``min_rate_fraction`` of the
  configured rate.
- *Slow increase.* While requests wait for tokens and no 429 comes, each success lets the rate
  grow by ``PROBE_GROWTH`` of itself every ``recovery_seconds``: slowly enough that probing
  above the account's rate causes only the odd 429, which starts the next round.
- *One overrun, one decision.* Answers to requests that were granted before the 429 that
  started a pause are the same overrun: they extend the pause as their ``Retry-After`` says
  but do not cut the rate again. Those requests were in flight when the 429 came, so each is
  charged a token of the new rate (the bucket goes into debt) and refunded if it, too, comes
  back 429 — it used none of the account's tokens then.

The bucket stays empty (or in debt) through a pause: bem's bucket refills during it for the
requests bem saw; ours must not, or the end of every pause would release a whole burst at once.

**Granted together.** While more requests wait than there are tokens, tokens gather until up to
half a burst of them can be granted at once (:func:`grants_together`): the same rate, fewer
wake-ups, and their answers written to the store together. A request granted with others that
has not gone out when one of them comes back 429 gives its token back and waits out the pause;
after a 429, requests are granted one at a time again.

No background task: the waiters themselves do the work. At most one waiter at a time (the
"timekeeper") sleeps on the clock until the next token or the end of a pause; the others wait on
their own event, which is set when they are granted a slot or must take over the timekeeping.
Which request an answer belongs to is known without the caller saying so: :meth:`slot` records
the grant it holds in a context variable of the calling task.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from fractions import Fraction
from typing import Protocol

import anyio
import msgspec

from runner.bucket import PROBE_GROWTH, RateState, TokenBucket, float_delay
from runner.clock import Clock

DEFAULT_RETRY_AFTER = 5.0
"""Pause after a 429 that came without a usable ``Retry-After``, in seconds."""
_MIN_SLEEP = 1e-6  # a timekeeper never sleeps for less, so rounding cannot make it spin


# -- the limiter ---------------------------------------------------------------------------------


class SharedTokens(Protocol):
    """A budget shared with other runners (:class:`runner.shared_budget.SharedBudget`)."""

    async def take(self) -> None: ...
    async def rate_limited(self, retry_after: float | None) -> None: ...


class _Grant(msgspec.Struct, eq=False):
    """One slot handed out: the request it is for is in flight until the slot is left."""

    owner: RateLimiter
    number: int
    granted_at: float
    epoch: int
    """How many overruns had begun when it was granted."""
    owes_token: bool = False
    """Charged to the bucket at a 429 that came while it was in flight."""
    rate_limited: bool = False
    retry_after: float = DEFAULT_RETRY_AFTER


_holding: ContextVar[_Grant | None] = ContextVar("bem_rate_limit_slot", default=None)
"""The slot the current task holds, so that an answer is matched to the request it is for."""


class _Waiter(msgspec.Struct, eq=False):
    kind: str
    grant: _Grant | None = None
    wake: anyio.Event = msgspec.field(default_factory=anyio.Event)


class RateLimiter:
    """Slots for requests to bem: at most ``max_concurrency`` at once, and no more than the
    ``rate``/``burst`` token bucket allows; learns the account's rate from 429s (see the module
    documentation).

    ``min_rate_fraction``: the rate is never cut below this fraction of the configured rate.
    ``recovery_seconds``: while requests wait for tokens and none is refused, the rate grows by
    ``PROBE_GROWTH`` of itself every this many seconds.
    ``shared``: runners sharing a store also draw every request's token from their common
    budget, and tell it of every 429 (so all of them pause)."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_concurrency: int,
        clock: Clock,
        min_rate_fraction: float = 0.01,
        recovery_seconds: float = 10.0,
        shared: SharedTokens | None = None,
    ) -> None:
        _check_limits(rate=rate, burst=burst, max_concurrency=max_concurrency)
        if not 0 < min_rate_fraction <= 1:
            raise ValueError(f"min_rate_fraction must be in (0, 1], not {min_rate_fraction!r}")
        if not (recovery_seconds > 0 and math.isfinite(recovery_seconds)):
            raise ValueError(f"recovery_seconds must be positive, not {recovery_seconds!r}")
        self._clock = clock
        self._shared = shared
        self._min_rate_fraction = min_rate_fraction
        self._growth_per_second = PROBE_GROWTH / recovery_seconds
        self._state = RateState.initial(
            configured=float(rate), floor=float(rate) * min_rate_fraction
        )
        self._burst = burst
        self._max_concurrency = max_concurrency
        self._bucket = TokenBucket(rate=rate, burst=burst)
        self._paused_until: float | None = None
        self._epoch = 0  # overruns so far
        self._resuming = False  # the next grant is the first after a pause
        self._granted = 0  # grants so far: the number of the next one
        self._held: set[_Grant] = set()
        self._queues: dict[str, deque[_Waiter]] = {}
        self._waiting = 0  # waiters in all the queues
        self._turns: deque[str] = deque()  # kinds with waiters, next to be served first
        self._timekeeper: _Waiter | None = None
        self._timer: anyio.CancelScope | None = None

    # -- public interface ------------------------------------------------------------------------

    @property
    def current_rate(self) -> float:
        return self._state.rate

    @property
    def learnt_rate(self) -> float | None:
        """The account's rate as estimated at the last 429, if one came with evidence."""
        return self._state.learnt

    @property
    def in_flight(self) -> int:
        return len(self._held)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting

    @property
    def paused_until(self) -> float | None:
        """The end of the current 429 pause (clock time), or None when not paused."""
        if self._paused_until is None or self._paused_until <= self._clock.now():
            return None
        return self._paused_until

    @asynccontextmanager
    async def slot(self, kind: str = "default") -> AsyncIterator[None]:
        """Hold one request slot: a concurrency slot and one token of the rate limit. A 429 or
        success reported while holding it is taken to be the answer to this request."""
        grant = await self._acquire(kind)
        if self._shared is not None:
            try:
                await self._shared.take()
            except BaseException:
                self._give_back(grant)
                raise
        holding = _holding.set(grant)
        answered = False
        try:
            yield
            answered = True
        finally:
            _holding.reset(holding)
            self._release(grant, answered=answered)
        if answered and grant.rate_limited and self._shared is not None:
            await self._shared.rate_limited(grant.retry_after)

    def on_rate_limited(self, retry_after: float | None) -> None:
        """bem answered 429: pause; if this is a new overrun, settle below the account's rate."""
        now = self._clock.now()
        if retry_after is None or not math.isfinite(retry_after):
            retry_after = DEFAULT_RETRY_AFTER
        until = now + max(0.0, retry_after)
        grant = self._grant_of_caller()
        new_overrun = self._is_new_overrun(grant, now)
        if self._paused_until is None or until > self._paused_until:
            self._paused_until = until
        if grant is not None:
            grant.rate_limited = True
            grant.retry_after = retry_after
        self._resuming = True
        if new_overrun:
            self._epoch += 1
            self._state = self._state.after_overrun(now, next_grant=self._granted)
            self._bucket.set_rate(now, self._state.rate)
            owing: Fraction | int = self._charge_requests_in_flight(besides=grant)
        else:
            refund = grant is not None and grant.owes_token
            if grant is not None:
                grant.owes_token = False
            owing = self._bucket.debt(now) - refund
        # bem's bucket is empty now, so ours is too
        self._bucket.empty(now, until=self._paused_until, owing=owing)
        self._kick(reschedule=True)

    def on_success(self) -> None:
        """A request went through: probe slowly upwards while requests wait for tokens."""
        now = self._clock.now()
        saturated = self.paused_until is None and self._waiting_for_tokens()
        before = self._state.rate
        self._state = self._state.after_success(
            now, saturated=saturated, growth_per_second=self._growth_per_second
        )
        if self._state.rate != before:
            self._bucket.set_rate(now, self._state.rate)
            self._kick(reschedule=True)

    def reconfigure(self, *, rate: float, burst: int, max_concurrency: int) -> None:
        """Apply new limits; a rate lowered after 429s stays as low (see :class:`RateState`)."""
        _check_limits(rate=rate, burst=burst, max_concurrency=max_concurrency)
        now = self._clock.now()
        self._state = self._state.reconfigured(
            configured=float(rate), floor=float(rate) * self._min_rate_fraction
        )
        self._bucket.set_rate(now, self._state.rate)
        self._bucket.set_burst(now, burst)
        self._burst = burst
        self._max_concurrency = max_concurrency
        self._kick(reschedule=True)

    # -- answers ---------------------------------------------------------------------------------

    def _grant_of_caller(self) -> _Grant | None:
        grant = _holding.get()
        return grant if grant is not None and grant.owner is self else None

    def _is_new_overrun(self, grant: _Grant | None, now: float) -> bool:
        if grant is not None:
            return grant.epoch == self._epoch  # granted since the last overrun began
        # an answer to a request we cannot place: new unless a pause is already on
        return self._paused_until is None or now >= self._paused_until

    def _charge_requests_in_flight(self, *, besides: _Grant | None) -> int:
        """Requests in flight will reach bem after this 429: each owes a token of the new rate."""
        charged = 0
        for grant in self._held:
            if grant is not besides:
                grant.owes_token = True
                charged += 1
        return charged

    def _waiting_for_tokens(self) -> bool:
        """Requests wait, and not for a free slot (the caller's own slot is about to be free)."""
        held = len(self._held) - (self._grant_of_caller() is not None)
        return bool(self._turns) and held < self._max_concurrency

    def _release(self, grant: _Grant, *, answered: bool) -> None:
        self._held.discard(grant)
        if answered and not grant.rate_limited:
            self._state = self._state.after_answer(grant.number, granted_at=grant.granted_at)
        self._kick()

    # -- waiting ---------------------------------------------------------------------------------

    async def _acquire(self, kind: str) -> _Grant:
        waiter = _Waiter(kind)
        self._enqueue(waiter)
        try:
            while True:
                self._dispatch()
                if waiter.grant is not None and waiter.grant.epoch == self._epoch:
                    break
                if waiter.grant is not None:
                    # granted with others, but bem refused one of them before this request
                    # went out: it waits for the pause instead, first in line
                    self._give_back(waiter.grant)
                    waiter.grant = None
                    self._enqueue(waiter, first=True)
                    continue
                await self._wait(waiter)
        except BaseException:
            self._withdraw(waiter)
            raise
        self._kick()  # if this waiter was keeping time, another one must take over
        return waiter.grant

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
        if len(self._held) >= self._max_concurrency:
            return None
        now = self._clock.now()
        delay = self._bucket.wait_time(now, self._tokens_to_gather())
        if self._paused_until is not None:
            delay = max(delay, float_delay(now, self._paused_until))
        return max(_MIN_SLEEP, delay)

    def _withdraw(self, waiter: _Waiter) -> None:
        """A waiter was cancelled: it takes no token and holds no slot."""
        if waiter.grant is not None:
            self._give_back(waiter.grant)
            return
        queue = self._queues[waiter.kind]
        queue.remove(waiter)
        self._waiting -= 1
        if not queue:
            del self._queues[waiter.kind]
            self._turns.remove(waiter.kind)
        self._kick()

    def _give_back(self, grant: _Grant) -> None:
        """A slot granted but never used: its token goes back to the bucket."""
        self._held.discard(grant)
        self._bucket.give_back()
        self._kick()

    # -- granting --------------------------------------------------------------------------------

    def _enqueue(self, waiter: _Waiter, *, first: bool = False) -> None:
        queue = self._queues.get(waiter.kind)
        if queue is None:
            queue = self._queues[waiter.kind] = deque()
            self._turns.append(waiter.kind)
        if first:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        self._waiting += 1

    def _dispatch(self) -> None:
        """Grant slots to waiters, kind by kind in turn, while limits allow."""
        now = self._clock.now()
        if self._paused_until is not None and now < self._paused_until:
            return
        if not self._turns or not self._bucket.holds(now, self._tokens_to_gather()):
            return
        while self._turns and len(self._held) < self._max_concurrency:
            # after a silence (a pause, or idle with the bucket refilled) bem's bucket is at most
            # full: a moment to measure from
            fresh = self._resuming or (not self._held and self._bucket.is_full(now))
            if not self._bucket.try_take(now):
                return
            kind = self._turns.popleft()
            queue = self._queues[kind]
            waiter = queue.popleft()
            self._waiting -= 1
            if queue:
                self._turns.append(kind)
            else:
                del self._queues[kind]
            waiter.grant = self._grant(now, fresh=fresh)
            waiter.wake.set()
            if waiter is self._timekeeper and self._timer is not None:
                self._timer.cancel()

    def _tokens_to_gather(self) -> int:
        """How many tokens to let gather before granting (see :func:`grants_together`)."""
        return grants_together(
            waiting=self.waiting,
            free_slots=self._max_concurrency - len(self._held),
            burst=self._burst,
            refused_before=self._epoch > 0,
        )

    def _grant(self, now: float, *, fresh: bool) -> _Grant:
        number = self._granted
        self._granted += 1
        if fresh:
            self._resuming = False
            self._state = self._state.after_resumption(now, grant=number, burst=self._burst)
        grant = _Grant(self, number, now, self._epoch)
        self._held.add(grant)
        return grant

    def _kick(self, *, reschedule: bool = False) -> None:
        """Grant what can be granted now and make sure someone keeps time for the rest."""
        self._dispatch()
        if not self._turns:
            return
        if self._timekeeper is None:
            self._queues[self._turns[0]][0].wake.set()
        elif reschedule and self._timer is not None:
            self._timer.cancel()


def grants_together(*, waiting: int, free_slots: int, burst: int, refused_before: bool) -> int:
    """How many requests are granted together while more wait than the bucket can grant.

    Each request woken alone costs its own wake-ups of the event loop, its own write to the
    store and its own commit; requests granted together share them. So while requests queue
    for tokens, tokens gather until up to half a burst can go at once. That never asks more of
    bem's bucket than the burst allows, and the rate is the same: only the spacing changes. No
    more gather than are waiting (a lone poll goes as soon as there is a token for it), and
    once bem has refused a request they go one at a time: the account's rate is then being
    learnt from how evenly spaced requests fare (:mod:`runner.bucket`).
    """
    if refused_before:
        return 1
    return max(1, min(burst // 2, waiting, free_slots))


def _check_limits(*, rate: float, burst: int, max_concurrency: int) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number, not {rate!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be a whole number >= 1, not {burst!r}")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise ValueError(f"max_concurrency must be a whole number >= 1, not {max_concurrency!r}")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be a whole number >= 1, not {max_concurrency!r}")
