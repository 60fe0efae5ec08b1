"""Webhook deliveries as bem makes them: one signed JSON POST per event, retried with backoff.

When a call ends (at its ``finished_at`` in emulator time) each of its output and error events
goes to every subscription that hears it (:meth:`Subscription.hears`). A delivery carries
``bem-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` under the secret
active when it is sent (none: unsigned). Any answer but a 2xx, or no answer, is retried after
``webhook_retry_base * 2**attempt`` seconds (capped at :data:`MAX_BACKOFF_SECONDS`) up to
``webhook_max_attempts`` tries.

The knobs (emulator settings): ``webhook_drop_rate`` (an event is never delivered),
``webhook_duplicate_rate`` (delivered twice), ``webhook_delay`` (seconds after the event before
the first try) and ``webhook_reorder_seconds`` (a random extra delay up to this, so deliveries
overtake each other). Everything waits on emulator time; :meth:`Dispatcher.run` runs beside the
HTTP server (:func:`runner.emulator.serve_emulator`).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import httpx
import msgspec

from runner.emulator import render
from runner.emulator.clock import Timekeeper
from runner.emulator.settings import EmulatorSettings
from runner.emulator.state import CallRecord
from runner.emulator.stats import Stats
from runner.emulator.subscriptions import WebhookBook

SIGNATURE_HEADER = "bem-signature"
MAX_BACKOFF_SECONDS = 60.0
MAX_PARALLEL_DELIVERIES = 32


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``bem-signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def call_events(record: CallRecord) -> list[dict[str, Any]]:
    """Every output and error event of a finished call, in item order."""
    events = []
    for item in record.items:
        if item.failure is None:
            events.append(render.output_event(record, item))
        else:
            events.append(render.error_event(record, item, item.failure))
    return events


class Delivery(msgspec.Struct):
    url: str
    body: bytes
    event_id: str
    attempt: int = 0


class _Due(msgspec.Struct, order=True):
    at: float
    seq: int
    """Unique: entries due at the same time are ordered by it, never by what they carry."""
    delivery: Delivery | None
    """None: the call ``record`` ends now and its events are to be sent."""
    record: CallRecord | None = None


class EmulatorForDeliveries(Protocol):
    """What deliveries read: live settings and counters, emulator time, the subscriptions."""

    @property
    def settings(self) -> EmulatorSettings: ...
    @property
    def time(self) -> Timekeeper: ...
    @property
    def counters(self) -> Stats: ...
    @property
    def webhooks(self) -> WebhookBook: ...


class Dispatcher:
    def __init__(
        self, emulator: EmulatorForDeliveries, *, wall: Callable[[], float] = time.time
    ) -> None:
        self._emulator = emulator
        self._wall = wall
        self._queue: list[_Due] = []
        self._seq = itertools.count()
        self._changed: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._in_flight = 0
        self.reseed(0)

    def reseed(self, seed: int) -> None:
        self._dice = random.Random(f"{seed}:webhooks")

    @property
    def pending(self) -> int:
        """Calls still to end plus deliveries waiting or in flight."""
        return len(self._queue) + self._in_flight

    def call_created(self, record: CallRecord) -> None:
        self._push(record.finished_at, None, record)

    async def wait_idle(self) -> None:
        """Until nothing is queued or in flight (calls not yet ended count as queued)."""
        while self.pending:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def run(self) -> None:
        """Send what is due, forever (cancel to stop)."""
        limiter = anyio.CapacityLimiter(MAX_PARALLEL_DELIVERIES)
        async with httpx.AsyncClient() as http, anyio.create_task_group() as tasks:
            while True:
                due = self._pop_due()
                if due is None:
                    await self._wait_for_next()
                elif due.record is not None:
                    self._fire(due.record)
                else:
                    assert due.delivery is not None
                    self._in_flight += 1
                    tasks.start_soon(self._send, http, limiter, due.delivery)

    def _fire(self, record: CallRecord) -> None:
        settings = self._emulator.settings
        now = self._emulator.time.now()
        for event in call_events(record):
            body = json.dumps(event, separators=(",", ":")).encode()
            for subscription in self._emulator.webhooks.hearing(event):
                assert subscription.webhook_url is not None
                if self._roll(settings.webhook_drop_rate):
                    self._emulator.counters.record_webhook("dropped")
                    continue
                copies = 2 if self._roll(settings.webhook_duplicate_rate) else 1
                if copies == 2:
                    self._emulator.counters.record_webhook("duplicated")
                for _ in range(copies):
                    delay = settings.webhook_delay
                    delay += self._dice.uniform(0, settings.webhook_reorder_seconds)
                    delivery = Delivery(subscription.webhook_url, body, event["eventID"])
                    self._push(now + delay, delivery)
        self._check_idle()

    async def _send(
        self, http: httpx.AsyncClient, limiter: anyio.CapacityLimiter, delivery: Delivery
    ) -> None:
        settings = self._emulator.settings
        counters = self._emulator.counters
        headers = {"content-type": "application/json", "user-agent": "bem-emulator-webhooks"}
        secret = self._emulator.webhooks.secret
        if secret is not None:
            headers[SIGNATURE_HEADER] = signature(secret, int(self._wall()), delivery.body)
        try:
            async with limiter:
                response = await http.post(
                    delivery.url,
                    content=delivery.body,
                    headers=headers,
                    timeout=settings.webhook_timeout,
                )
            status: int | str = response.status_code
        except httpx.HTTPError:
            status = "unreachable"
        counters.record_webhook_attempt(status)
        self._in_flight -= 1
        if isinstance(status, int) and 200 <= status < 300:
            counters.record_webhook("delivered")
        elif delivery.attempt + 1 < settings.webhook_max_attempts:
            counters.record_webhook("retried")
            backoff = min(MAX_BACKOFF_SECONDS, settings.webhook_retry_base * 2**delivery.attempt)
            delivery.attempt += 1
            self._push(self._emulator.time.now() + backoff, delivery)
        else:
            counters.record_webhook("failed")
        self._check_idle()

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self._dice.random() < rate

    def _push(self, at: float, delivery: Delivery | None, record: CallRecord | None = None) -> None:
        heapq.heappush(self._queue, _Due(at, next(self._seq), delivery, record))
        if self._changed is not None:
            self._changed.set()

    def _pop_due(self) -> _Due | None:
        if self._queue and self._queue[0].at <= self._emulator.time.now():
            return heapq.heappop(self._queue)
        return None

    async def _wait_for_next(self) -> None:
        """Until the earliest entry is due (emulator time) or a new one is queued."""
        changed = self._changed = anyio.Event()
        if not self._queue:
            await changed.wait()
            return
        deadline = self._queue[0].at
        async with anyio.create_task_group() as race:

            async def due() -> None:
                await self._emulator.time.sleep_until(deadline)
                race.cancel_scope.cancel()

            race.start_soon(due)
            await changed.wait()
            race.cancel_scope.cancel()

    def _check_idle(self) -> None:
        if not self.pending and self._idle is not None:
            self._idle.set()
            self._idle = None
