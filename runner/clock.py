"""Time, as the rest of the runner sees it.

Everything that waits or timestamps goes through a :class:`Clock`, so tests can drive time with
:class:`FakeClock` instead of sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Protocol

import anyio
import anyio.lowlevel
import msgspec


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds, for deadlines and intervals."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time; zero or less only yields once."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for timestamps and HTTP dates."""
        ...

    async def wait(self, event: anyio.Event, seconds: float) -> bool:
        """Until ``event`` is set or ``seconds`` of this clock's time have passed; whether the
        event is set. Zero or less only yields once."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``anyio.sleep`` and ``time.time``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    def wall(self) -> float:
        return time.time()

    async def wait(self, event: anyio.Event, seconds: float) -> bool:
        if not event.is_set():
            with anyio.move_on_after(max(0.0, seconds)):
                await event.wait()
        return event.is_set()


class _Sleeper(msgspec.Struct, order=True):
    deadline: float
    seq: int
    """Unique: sleepers with the same deadline are ordered by it, never by ``woken``."""
    woken: anyio.Event


class FakeClock:
    """A clock that moves only when told to.

    ``advance`` moves ``now()`` and ``wall()`` together and wakes, in deadline order, every
    sleeper whose deadline has been reached. A woken sleeper stops counting in :attr:`sleepers`
    at once, so ``advance(...)`` followed by ``await wait_for_sleepers(n)`` waits for the woken
    tasks to go back to sleep.
    """

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._wall_offset = float(wall_start) - self._now
        self._heap: list[_Sleeper] = []
        self._seq = itertools.count()
        self._changed = anyio.Event()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if math.isnan(seconds):
            raise ValueError("cannot sleep for NaN seconds")
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = _Sleeper(self._now + seconds, next(self._seq), anyio.Event())
        heapq.heappush(self._heap, sleeper)
        self._notify()
        try:
            await sleeper.woken.wait()
        finally:
            if not sleeper.woken.is_set():  # cancelled while asleep
                self._heap.remove(sleeper)
                heapq.heapify(self._heap)
                self._notify()

    async def wait(self, event: anyio.Event, seconds: float) -> bool:
        if event.is_set():
            await anyio.lowlevel.checkpoint()
            return True
        async with anyio.create_task_group() as tg:

            async def ring() -> None:
                await self.sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(ring)
            await event.wait()
            tg.cancel_scope.cancel()
        return event.is_set()

    @property
    def sleepers(self) -> int:
        """How many tasks are asleep on this clock right now."""
        return len(self._heap)

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline of a sleeping task, if any."""
        return self._heap[0].deadline if self._heap else None

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0) and wake every sleeper that is due."""
        if not seconds >= 0:
            raise ValueError(f"a clock cannot go backwards (advance({seconds!r}))")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        """Move time forward to ``when`` (never backwards) and wake every sleeper that is due."""
        if not when >= self._now:
            raise ValueError(f"a clock cannot go backwards (from {self._now!r} to {when!r})")
        self._now = when
        woke = False
        while self._heap and self._heap[0].deadline <= self._now:
            heapq.heappop(self._heap).woken.set()
            woke = True
        if woke:
            self._notify()

    def advance_to_next_deadline(self) -> float | None:
        """Jump to the earliest sleeper's deadline (waking it); returns that time, or None."""
        deadline = self.next_deadline
        if deadline is not None:
            self.advance_to(max(deadline, self._now))
        return deadline

    async def wait_for_sleepers(self, count: int) -> None:
        """Wait until at least ``count`` tasks are asleep on this clock."""
        while len(self._heap) < count:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
