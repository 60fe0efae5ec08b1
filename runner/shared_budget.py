"""One rate budget for runners sharing a store: tokens drawn from it a few at a time.

The store keeps the account's token bucket, timed by its own clock (:meth:`Store.take_tokens`).
A runner takes a small batch and spends it locally, so a request costs a fraction of a round
trip; tokens unspent for :data:`STASH_SECONDS` are dropped, so a runner that went quiet never
adds a stash of its own to the account's burst. A 429 seen by any runner pauses every runner
(:meth:`Store.pause_sending`) and halves the rate they share. The runner's own
:class:`~runner.ratelimit.RateLimiter` still paces it and caps its requests in flight; this is
the budget all runners' requests come out of.
"""

from __future__ import annotations

import math

import anyio
import structlog

from runner.clock import Clock
from runner.errors import StoreUnavailableError
from runner.ratelimit import DEFAULT_RETRY_AFTER
from runner.store.base import Store, Tokens

log = structlog.get_logger("runner.shared_budget")

BATCH_SECONDS = 0.1
"""A take asks for about this many seconds' worth of the rate (at least one token)."""
MAX_BATCH = 8
STASH_SECONDS = 1.0
"""Tokens taken but not spent within this long are dropped."""
UNREACHABLE_SECONDS = 1.0
"""After a take found the store unreachable, the others fail at once for this long."""
MAX_WAIT_SECONDS = 1.0
"""When the budget is empty, ask again at least this often (the pause may be lifted, the rate
raised by the configuration)."""


def batch_size(rate: float, burst: float) -> int:
    """How many tokens one take asks for at ``rate``: a tenth of a second's worth, 1 to 8."""
    return max(1, min(MAX_BATCH, math.floor(burst), math.floor(rate * BATCH_SECONDS)))


class SharedBudget:
    """Tokens for this runner's requests, from the budget every runner of the store shares."""

    def __init__(self, store: Store, *, rate: float, burst: float, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._lock = anyio.Lock()
        self._stash = 0
        self._taken_at = 0.0
        self._unreachable: tuple[float, str] | None = None
        """When the store last could not be reached, and why."""
        self.rate = rate
        self.burst = burst

    def reconfigure(self, *, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst

    async def take(self) -> None:
        """One token: from the local stash, else from the store (waiting while it has none)."""
        async with self._lock:
            if self._clock.now() - self._taken_at >= STASH_SECONDS:
                self._stash = 0
            while self._stash == 0:
                tokens = await self._take_from_store()
                if tokens.granted:
                    self._stash, self._taken_at = tokens.granted, self._clock.now()
                else:
                    await self._clock.sleep(min(tokens.wait_seconds, MAX_WAIT_SECONDS))
            self._stash -= 1

    async def _take_from_store(self) -> Tokens:
        """A batch from the store. Requests queued behind one that found the store unreachable
        fail at once for a while, rather than each waiting in turn to find it so again."""
        now = self._clock.now()
        if self._unreachable is not None and now - self._unreachable[0] < UNREACHABLE_SECONDS:
            raise StoreUnavailableError(self._unreachable[1])
        try:
            tokens = await self._store.take_tokens(
                batch_size(self.rate, self.burst), rate=self.rate, burst=self.burst
            )
        except StoreUnavailableError as exc:
            self._unreachable = (self._clock.now(), exc.message)
            raise
        self._unreachable = None
        return tokens

    async def rate_limited(self, retry_after: float | None) -> None:
        """bem answered 429: every runner pauses until ``Retry-After`` (best effort: this
        runner's own limiter pauses it anyway, whether the store can be told or not)."""
        self._stash = 0
        seconds = DEFAULT_RETRY_AFTER if retry_after is None else retry_after
        try:
            await self._store.pause_sending(seconds)
        except StoreUnavailableError as exc:
            log.info("cannot tell the other runners to pause", error=exc.message)
