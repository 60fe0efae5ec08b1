"""The emulator: settings, emulator time, the calls it holds, its counters, and its ASGI app."""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette

from runner.emulator.app import build_app
from runner.emulator.clock import Timekeeper
from runner.emulator.deliveries import Dispatcher
from runner.emulator.faults import FaultDice, FaultPlan, TokenBucket
from runner.emulator.inputs import CallInput
from runner.emulator.listing import ListQuery, select_calls
from runner.emulator.settings import EmulatorSettings
from runner.emulator.state import CallRecord, CallStore, Target, build_call, decide_failure
from runner.emulator.stats import Stats
from runner.emulator.subscriptions import WebhookBook


class Emulator:
    """A bem-compatible API in memory. ``clock`` (default ``time.monotonic``) drives emulator
    time together with :meth:`advance`; all randomness comes from ``settings.seed``, except
    the part of each call ID that tells this emulator's calls from those of any other run.

    ``instance`` (default: random) is that part: two emulators — a restart with the same seed,
    say — never hand out the same call ID, as bem never reuses one.
    """

    def __init__(
        self,
        settings: EmulatorSettings | None = None,
        *,
        clock: Callable[[], float] | None = None,
        instance: str | None = None,
    ) -> None:
        self._settings = settings or EmulatorSettings()
        self.instance = instance if instance is not None else secrets.token_hex(6)
        self.time = Timekeeper(clock or time.monotonic)
        self.calls = CallStore()
        self.counters = Stats()
        self.webhooks = WebhookBook()
        self.deliveries = Dispatcher(self)
        self._seed_randomness(self._settings.seed)
        self._bucket: TokenBucket | None = None
        self._app = build_app(self)

    @property
    def app(self) -> Starlette:
        return self._app

    @property
    def settings(self) -> EmulatorSettings:
        return self._settings

    def advance(self, seconds: float) -> None:
        """Move emulator time forward: calls progress, tokens refill, lag passes, waits end."""
        self.time.advance(seconds)

    def update(self, **changes: object) -> None:
        """Change settings at runtime; ConfigError (nothing changed) when the result is invalid."""
        previous = self._settings
        self._settings = previous.with_changes(changes)
        if self._settings.seed != previous.seed:
            self._seed_randomness(self._settings.seed)
        limit = (self._settings.rate_limit_rps, self._settings.rate_limit_burst)
        if limit != (previous.rate_limit_rps, previous.rate_limit_burst):
            self._bucket = None

    def stats(self) -> dict[str, Any]:
        """The same document as ``GET /_emulator/stats``."""
        return self.counters.snapshot(self.calls, self.time.now())

    def reset_stats(self) -> None:
        """Zero every counter; the calls themselves stay retrievable."""
        self.counters = Stats()

    async def wait_blocked(self, count: int = 1) -> None:
        """Return once ``count`` requests are waiting for emulator time (slow or ``wait=true``)."""
        await self.time.wait_blocked(count)

    # -----------------------------------------------------------------------------------------
    # used by the app

    def create_call(self, target: Target, call_input: CallInput) -> CallRecord:
        settings = self._settings
        seq = len(self.calls) + 1
        record = build_call(
            call_id=f"call_{self.instance}{seq:08x}{self._ids.getrandbits(32):08x}",
            seq=seq,
            target=target,
            call_input=call_input,
            failures=[
                decide_failure(item, settings.failure_rate, self._failures)
                for item in call_input.items
            ],
            created_at=self.time.now(),
            created_wall=datetime.now(UTC),
            latency=self._latency.uniform(settings.latency_min, settings.latency_max),
        )
        self.calls.add(record)
        self.counters.record_call(record)
        self.deliveries.call_created(record)
        return record

    def list_calls(self, query: ListQuery) -> list[CallRecord]:
        return select_calls(
            self.calls,
            query,
            now=self.time.now(),
            visibility_lag=self._settings.list_visibility_lag,
        )

    async def wait_for(self, record: CallRecord) -> None:
        """Until the call is terminal or ``wait_timeout`` has passed, whichever comes first."""
        deadline = min(record.finished_at, self.time.now() + self._settings.wait_timeout)
        await self.time.sleep_until(deadline)

    async def sleep(self, seconds: float) -> None:
        await self.time.sleep_until(self.time.now() + seconds)

    def take_token(self) -> float:
        """0 when the request may proceed, else the seconds until the rate limit allows one."""
        rate = self._settings.rate_limit_rps
        if rate is None:
            return 0.0
        if self._bucket is None:
            self._bucket = TokenBucket(rate, self._settings.rate_limit_burst, self.time.now())
        return self._bucket.take(self.time.now())

    def plan_faults(self, *, creates: bool) -> FaultPlan:
        return self._dice.plan(self._settings, creates=creates)

    def _seed_randomness(self, seed: int) -> None:
        # Separate streams keep call IDs and latencies stable when fault settings change.
        self._ids = random.Random(f"{seed}:ids")
        self._latency = random.Random(f"{seed}:latency")
        self._failures = random.Random(f"{seed}:failures")
        self._dice = FaultDice(seed)
        self.deliveries.reseed(seed)
