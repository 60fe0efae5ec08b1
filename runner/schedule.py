"""When to poll each open call, as pure functions of what is known.

What is known: the time now, each open call's submission time and polls so far, how long the
calls already finished on its workflow took (bem's ``finishedAt`` − ``createdAt``), whether
submits are still pending, the rate, and the poll requests this runner may still spend.

- **A shared grid.** Polls go out on a grid of ``tick`` seconds of wall time, so calls due
  near each other share one batched GET (up to ``poll.calls_per_request`` calls).
- **Learnt latencies.** A call is first polled once its workflow's fastest calls would have
  finished (:data:`START_QUANTILE`), then at every tick until it is older than
  :data:`OVERDUE_FACTOR` × the longest learnt latency, from when it backs off (each wait as long
  as the call is overdue, so doubling). Among calls due at the same tick, the ones most likely
  to have finished since their last poll come first. Until :data:`MIN_SAMPLES` calls of a
  workflow have finished, its calls are polled every ``poll.initial_seconds`` for their first
  :data:`COLD_POLLS` polls (on that grid, so they share requests), then on the exponential
  schedule of :func:`poll_delay`.
- **Rate budget.** While submits are pending, polls take at most :data:`POLL_SHARE` of the
  rate, so they never starve submits; once nothing is left to submit (a drain's last POSTs are
  out) the whole rate is spare and the grid tightens to :data:`TAIL_TICK_SECONDS`.
- **Request budget.** Every call earns :data:`ALLOWANCE_PER_CALL` poll requests (plus
  :data:`INITIAL_CREDITS` once), so polls per call stay below that with one call per file. The
  tail's grid is never finer than the credits left can pay for until the open calls are
  expected to be done; with no credits left, one request per ``poll.initial_seconds``.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Iterable

import msgspec

from runner.policy import poll_delay
from runner.webhook_policy import CONFIRM_WINDOW_SECONDS

MIN_SAMPLES = 5
"""Finished calls of a workflow needed before its latencies replace the exponential schedule."""
SAMPLES_KEPT = 256
COLD_POLLS = 5
"""Polls a call gets every ``poll.initial_seconds`` while its workflow's latencies are unknown:
a drain's first calls mostly finish within them (learning needs some seen finishing), and a
call still running after them backs off."""
START_QUANTILE = 0.05
"""A call is first polled once this fraction of its workflow's finished calls had taken as long."""
OVERDUE_FACTOR = 1.5
"""Older than this × the longest learnt latency, a call is overdue and its polls back off."""
TAIL_TICK_SECONDS = 0.25
"""The grid once nothing is left to submit (and the rate and credits allow it)."""
POLL_SHARE = 0.1
"""While submits are pending, polls use at most this share of the rate."""
ALLOWANCE_PER_CALL = 0.13
"""Poll requests each call earns: requests per file stay <= 1 + this with one call per file."""
INITIAL_CREDITS = 2.0
MAX_REQUESTS_PER_TICK = 100
TICK_QUANTUM = 0.05
MIN_EXTRA_FILL = 0.2
"""A second request at one grid point goes out only for at least this fraction of a page."""
_MIN_STEP = 1e-6  # a wait for a request to be allowed again is never lost to rounding
PRIORITY_SPREAD = 0.01
"""Calls due at one tick are spread over this fraction of a tick, most likely finished first."""


class Latencies(msgspec.Struct, frozen=True):
    """Seconds the finished calls of one workflow took, ascending (never empty)."""

    ascending: tuple[float, ...]

    @classmethod
    def of(cls, samples: Iterable[float]) -> Latencies | None:
        """The distribution of ``samples``; None while fewer than :data:`MIN_SAMPLES`."""
        ordered = tuple(sorted(max(0.0, s) for s in samples if math.isfinite(s)))
        return cls(ordered) if len(ordered) >= MIN_SAMPLES else None

    @property
    def longest(self) -> float:
        return self.ascending[-1]

    def quantile(self, fraction: float) -> float:
        """The nearest-rank quantile: at least ``fraction`` of the samples are no longer."""
        rank = math.ceil(min(max(fraction, 0.0), 1.0) * len(self.ascending))
        return self.ascending[max(rank, 1) - 1]

    def cdf(self, seconds: float) -> float:
        """The fraction of the samples no longer than ``seconds``."""
        return bisect.bisect_right(self.ascending, seconds) / len(self.ascending)


class Outlook(msgspec.Struct, frozen=True):
    """The pipeline now, as far as the grid depends on it."""

    submits_pending: bool
    rate: float
    """Requests per second the rate limiter allows."""
    open_calls: int
    calls_per_request: int
    credits: float
    """Poll requests this runner may still spend (:func:`poll_credits`)."""
    horizon: float
    """Seconds until the open calls are expected to be done."""


class Grid(msgspec.Struct, frozen=True):
    """Polls go out every ``tick`` seconds, at most ``requests`` requests at each."""

    tick: float
    requests: int

    def point(self, now: float) -> tuple[float, int]:
        """The grid point ``now`` belongs to: the nearest one."""
        return (self.tick, round(now / self.tick))


def quantized(tick: float) -> float:
    """``tick`` rounded up to a multiple of :data:`TICK_QUANTUM`: the grid changes seldom, so
    calls scheduled on it meet again at its points."""
    return math.ceil(tick / TICK_QUANTUM - 1e-9) * TICK_QUANTUM


def poll_credits(*, calls: int, requests: int) -> float:
    """Poll requests left: what ``calls`` calls earned, less the ``requests`` already sent."""
    return INITIAL_CREDITS + ALLOWANCE_PER_CALL * max(0, calls) - max(0, requests)


def grid_for(outlook: Outlook, *, base: float) -> Grid:
    """The grid: how often polls go out, and how many requests each time.

    ``base`` is the period while submits are pending (``poll.initial_seconds``). Polls then use
    at most :data:`POLL_SHARE` of the rate and what the new calls earn meanwhile (what a grid
    point does not need is kept for the tail); in the tail the grid is
    :data:`TAIL_TICK_SECONDS`, as fast as the rate allows, and the credits left are spread
    evenly until the open calls are due to be done.
    With no credit left, one request every ``base`` seconds: open calls are never abandoned.
    """
    if outlook.credits < 1:
        return Grid(quantized(max(base, 1 / outlook.rate)), 1)
    needed = max(1, math.ceil(outlook.open_calls / max(1, outlook.calls_per_request)))
    if outlook.submits_pending:
        earned_per_tick = ALLOWANCE_PER_CALL * outlook.rate * base
        requests = max(1, min(needed, math.floor(earned_per_tick), math.floor(outlook.credits),
                              MAX_REQUESTS_PER_TICK))  # fmt: skip
        return Grid(quantized(max(base, requests / (POLL_SHARE * outlook.rate))), requests)
    tick = max(min(TAIL_TICK_SECONDS, base), 1 / outlook.rate)
    horizon = max(outlook.horizon, tick)
    requests = max(1, min(needed, math.floor(outlook.credits * tick / horizon),
                          MAX_REQUESTS_PER_TICK))  # fmt: skip
    # one request a tick and still more than the credits can pay for: ticks further apart
    tick = max(tick, requests / outlook.rate, horizon / outlook.credits)
    return Grid(quantized(tick), requests)


def on_grid(at: float, tick: float) -> float:
    """The first point of the grid of period ``tick`` at or after ``at``.

    A grid point is its own point (``at / tick`` may round above an integer that ``k * tick``
    gave exactly), so calls put on a point stay on it when they are placed again.
    """
    k = math.ceil(at / tick)
    if (k - 1) * tick >= at:
        k -= 1
    while k * tick < at:
        k += 1
    return k * tick


def finished_since(latencies: Latencies, *, age_then: float, age_at: float) -> float:
    """The chance that a call unfinished at ``age_then`` has finished by ``age_at``."""
    before = latencies.cdf(age_then)
    if before >= 1.0:
        return 1.0
    return max(0.0, latencies.cdf(age_at) - before) / (1.0 - before)


def next_poll_at(
    *,
    now: float,
    submitted_at: float,
    attempts: int,
    latencies: Latencies | None,
    tick: float | None,
    initial: float,
    maximum: float,
    rng: random.Random,
) -> float:
    """When to poll a call next (``attempts``: polls it had so far, 0 for a new call).

    Never before ``now``, never more than ``max(maximum, tick)`` plus a tick after it.
    """
    if latencies is None or tick is None:
        if attempts < COLD_POLLS:
            return max(now, on_grid(now + initial / 2, initial))
        return now + poll_delay(
            attempts - COLD_POLLS + 1, initial=initial, maximum=maximum, rng=rng
        )
    start = submitted_at + latencies.quantile(START_QUANTILE)
    overdue_at = submitted_at + OVERDUE_FACTOR * latencies.longest
    earliest = now + tick / 2
    if now >= overdue_at:
        at = now + min(maximum, max(tick, now - overdue_at))
    else:
        at = max(earliest, min(start, now + maximum))
    slot = on_grid(at, tick)
    likely = finished_since(latencies, age_then=now - submitted_at, age_at=slot - submitted_at)
    return max(now, slot - tick * PRIORITY_SPREAD * likely)


def ride_along_seconds(grid: Grid | None, *, initial: float, events_flowing: bool = False) -> float:
    """How far ahead of now calls are taken into the same request as the ones due.

    While webhook events flow, a call bem announced is fetched at once (:meth:`PollPlan.may_send`)
    and is due a confirmation window after its event: the calls announced within that window
    go in the same request, or each event would cost a GET of its own.
    """
    ride = initial if grid is None else grid.tick * PRIORITY_SPREAD
    return max(ride, CONFIRM_WINDOW_SECONDS) if events_flowing else ride


class PollPlan(msgspec.Struct):
    """What the schedule learns as the runner goes: latencies per workflow, calls, requests.

    Shared by the submitter (a new call's first poll) and the poller (every other one).
    """

    grid: Grid | None = None
    """The grid the poller last chose; None: the exponential schedule."""
    calls: int = 0
    """Calls that started to be followed in this process."""
    requests: int = 0
    """Poll requests sent in this process."""
    last_call_at: float | None = None
    """When the latest call started to be followed."""
    _point: tuple[float, int] = (0.0, 0)
    _spent: int = 0
    """The grid point of the latest request, and the requests sent at it."""
    _samples: dict[str, deque[float]] = msgspec.field(default_factory=dict)
    _ordered: dict[str, list[float]] = msgspec.field(default_factory=dict)
    """The usable samples of each workflow, kept sorted as they come and go (as
    :meth:`Latencies.of` would sort them), so a new sample never sorts them all again."""
    _learnt: dict[str, Latencies | None] = msgspec.field(default_factory=dict)
    """The distribution of each workflow's samples, computed once per change of them."""

    def learn(self, workflow: str, seconds: float) -> bool:
        """One more finished call; True if its workflow's latencies are learnt from now on."""
        was_learnt = self.latencies(workflow) is not None
        samples = self._samples.get(workflow)
        if samples is None:
            samples = self._samples[workflow] = deque(maxlen=SAMPLES_KEPT)
        ordered = self._ordered.setdefault(workflow, [])
        if len(samples) == samples.maxlen and math.isfinite(samples[0]):
            del ordered[bisect.bisect_left(ordered, max(0.0, samples[0]))]
        samples.append(seconds)
        if math.isfinite(seconds):
            bisect.insort(ordered, max(0.0, seconds))
        self._learnt.pop(workflow, None)
        return not was_learnt and self.latencies(workflow) is not None

    def latencies(self, workflow: str) -> Latencies | None:
        if workflow not in self._learnt:
            ordered = self._ordered.get(workflow, [])
            learnt = len(ordered) >= MIN_SAMPLES
            self._learnt[workflow] = Latencies(tuple(ordered)) if learnt else None
        return self._learnt[workflow]

    @property
    def tick(self) -> float | None:
        return self.grid.tick if self.grid is not None else None

    @property
    def longest(self) -> float:
        """The longest latency learnt on any workflow (0 before any is learnt)."""
        learnt = (self.latencies(w) for w in self._samples)
        return max((d.longest for d in learnt if d is not None), default=0.0)

    def horizon(self, now: float) -> float:
        """Seconds until the latest call is expected to be done, at the longest learnt latency."""
        if self.last_call_at is None:
            return 0.0
        return max(0.0, self.last_call_at + self.longest - now)

    def started(self, now: float) -> None:
        """A new call is followed from ``now``: it earns its credits."""
        self.calls += 1
        self.last_call_at = now if self.last_call_at is None else max(self.last_call_at, now)

    def may_send(
        self, now: float, *, calls: int, per_request: int, announced: bool = False
    ) -> bool:
        """Whether the grid allows a request for ``calls`` due calls at ``now``: the first at a
        grid point always, more only while the point has requests left and the page is worth
        it (:data:`MIN_EXTRA_FILL`); off the grid, always. ``announced``: bem said one of them
        has finished (a webhook event): it is fetched now, not at the next grid point."""
        if self.grid is None or announced:
            return True
        if self._point != self.grid.point(now):
            return True
        return self._spent < self.grid.requests and calls >= MIN_EXTRA_FILL * per_request

    def sent(self, now: float) -> None:
        """One poll request went out at ``now``."""
        self.requests += 1
        if self.grid is not None:
            point = self.grid.point(now)
            self._spent = self._spent + 1 if point == self._point else 1
            self._point = point

    def next_slot_in(self, now: float) -> float:
        """Seconds until the calls of the next grid point are due."""
        if self.grid is None:
            return 0.0
        tick = self.grid.tick
        return max(0.0, (self.grid.point(now)[1] + 1 - PRIORITY_SPREAD) * tick - now) + _MIN_STEP

    @property
    def credits(self) -> float:
        return poll_credits(calls=self.calls, requests=self.requests)
