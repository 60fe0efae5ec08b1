"""Counters for tests and benchmarks: requests by route and status, calls, files, faults.

``files_by_content_sha256`` counts how many calls each distinct file content went into, so a
test can prove that no file was submitted twice. Requests to ``/_emulator/*`` are not counted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from runner.emulator.state import CALL_STATUSES, CallRecord, CallStore

WEBHOOK_KINDS = ("delivered", "retried", "failed", "dropped", "duplicated")
FAULT_KINDS = ("error_5xx", "error", "accept_then_500", "dropped", "slow", "redirected")


class Stats:
    def __init__(self) -> None:
        self._requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._calls_total = 0
        self._calls_by_reference: Counter[str] = Counter()
        self._files: Counter[str] = Counter()
        self._rate_limited = 0
        self._faults: Counter[str] = Counter()
        self._retry_after_until = float("-inf")
        self._early_after_429 = 0
        self._webhooks: Counter[str] = Counter()
        self._webhook_attempts: Counter[str] = Counter()

    def record_request(self, route: str, status: int | str) -> None:
        """``route`` is "<METHOD> <route template>"; ``status`` a code or "dropped"."""
        self._requests[route][str(status)] += 1

    def record_rate_limited(self, *, now: float, retry_after_seconds: float) -> None:
        """A 429 told the client to wait ``retry_after_seconds`` from ``now`` (emulator time)."""
        self._rate_limited += 1
        self._retry_after_until = max(self._retry_after_until, now + retry_after_seconds)

    def record_arrival(self, now: float) -> None:
        """An authenticated API request arrived; count it if a ``Retry-After`` still forbids it."""
        if now < self._retry_after_until:
            self._early_after_429 += 1

    def record_fault(self, kind: str) -> None:
        self._faults[kind] += 1

    def record_webhook(self, kind: str) -> None:
        """A delivery was "delivered", "retried", "failed" (no tries left), "dropped" or
        "duplicated" (on purpose)."""
        self._webhooks[kind] += 1

    def record_webhook_attempt(self, status: int | str) -> None:
        self._webhook_attempts[str(status)] += 1

    def record_call(self, record: CallRecord) -> None:
        self._calls_total += 1
        if record.call_reference_id is not None:
            self._calls_by_reference[record.call_reference_id] += 1
        self._files.update(item.sha256 for item in record.items)

    def snapshot(self, store: CallStore, now: float) -> dict[str, Any]:
        by_status = Counter(record.status(now) for record in store)
        return {
            "requests": {route: dict(statuses) for route, statuses in self._requests.items()},
            "calls_total": self._calls_total,
            "calls_by_reference": dict(self._calls_by_reference),
            "rate_limited": self._rate_limited,
            "requests_before_retry_after": self._early_after_429,
            "files_by_content_sha256": dict(self._files),
            "faults": {kind: self._faults[kind] for kind in FAULT_KINDS},
            "calls_by_status": {status: by_status[status] for status in CALL_STATUSES},
            "webhooks": {
                **{kind: self._webhooks[kind] for kind in WEBHOOK_KINDS},
                "attempts": dict(self._webhook_attempts),
            },
        }
