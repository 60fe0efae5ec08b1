"""When to poll a call while webhook events flow, as pure functions, and what they learn from.

An event never ends a call by itself: it brings the call's next poll forward to within
:data:`CONFIRM_WINDOW_SECONDS`, so events arriving together share one batched GET. While events
flow, a call without one is polled only at the long safety-net interval — until it is overdue
(older than calls take to produce their events), from when it is polled as without webhooks. So a
receiver that is down, unreachable or misconfigured costs time, never a file.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import msgspec

from runner.store.base import CallRow

CONFIRM_WINDOW_SECONDS = 0.2
"""An event's call is polled this soon; events arriving meanwhile ride along in the same GET."""
MIN_SAMPLES = 5
"""Submit-to-event durations needed before they replace ``overdue_after`` as the expectation."""
EXPECTED_QUANTILE = 0.95
EXPECTED_FACTOR = 2.0
MIN_EXPECTED_SECONDS = 1.0
SAMPLES_KEPT = 256


def expected_event_seconds(durations: Sequence[float], *, default: float) -> float:
    """How long after submission a call's events are due: twice the 95th percentile of recent
    submit-to-event durations (at least a second), or ``default`` until a few are known."""
    if len(durations) < MIN_SAMPLES:
        return default
    ordered = sorted(durations)
    index = min(len(ordered) - 1, math.ceil(EXPECTED_QUANTILE * len(ordered)) - 1)
    return max(MIN_EXPECTED_SECONDS, EXPECTED_FACTOR * ordered[index])


def events_flowing(
    *, now: float, listening_since: float, last_event_at: float | None, quiet_after: float
) -> bool:
    """Events flow while one arrived (or the receiver started) less than ``quiet_after`` ago."""
    latest = max(listening_since, last_event_at if last_event_at is not None else -math.inf)
    return now - latest < quiet_after


def relaxed_poll_at(
    *,
    normal_at: float,
    now: float,
    submitted_at: float,
    event_at: float | None,
    flowing: bool,
    expected: float,
    safety_net: float,
) -> float:
    """When to poll a call next, given when the schedule without webhooks would (``normal_at``).

    A call with an event (being confirmed), or any call while no events flow, keeps the normal
    schedule; so does one past its expected time. Any other waits for its expected time, but at
    most ``safety_net`` seconds — and never less than the normal schedule would.
    """
    if event_at is not None or not flowing:
        return normal_at
    overdue_at = submitted_at + expected
    if now >= overdue_at:
        return normal_at
    return max(normal_at, min(overdue_at, now + safety_net))


class EventFlow(msgspec.Struct):
    """What the receiver has heard, for the poller's schedule (:func:`relaxed_poll_at`)."""

    overdue_after: float
    safety_net: float
    listening_since: float
    last_event_at: float | None = None
    dropped: int = 0
    """Events dropped unmatched (for calls this runner never made), since startup."""
    _durations: deque[float] = msgspec.field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))

    def heard(self, now: float, submitted_at: float | None) -> None:
        """A verified event arrived; ``submitted_at``: when its call was sent, if it is known."""
        self.last_event_at = now
        if submitted_at is not None:
            self._durations.append(max(0.0, now - submitted_at))

    @property
    def expected(self) -> float:
        return expected_event_seconds(self._durations, default=self.overdue_after)

    def flowing(self, now: float) -> bool:
        return events_flowing(
            now=now,
            listening_since=self.listening_since,
            last_event_at=self.last_event_at,
            quiet_after=max(self.safety_net, self.expected),
        )

    def poll_at(self, call: CallRow, normal_at: float, *, now: float) -> float:
        submitted = call.submitted_at if call.submitted_at is not None else now
        return relaxed_poll_at(
            normal_at=normal_at,
            now=now,
            submitted_at=submitted,
            event_at=call.event_at,
            flowing=self.flowing(now),
            expected=self.expected,
            safety_net=self.safety_net,
        )

    def first_poll_at(self, normal_at: float, *, now: float) -> float:
        """The first poll of a call submitted ``now`` (no event yet)."""
        return relaxed_poll_at(
            normal_at=normal_at,
            now=now,
            submitted_at=now,
            event_at=None,
            flowing=self.flowing(now),
            expected=self.expected,
            safety_net=self.safety_net,
        )
