"""Emulator time: an underlying clock plus an offset that tests move forward explicitly.

Everything time-dependent in the emulator (call progress, token refill, visibility lag, slow
responses, ``wait=true``) reads :meth:`Timekeeper.now`. A request that has to wait for emulator
time sleeps in :meth:`Timekeeper.sleep_until`, which wakes both when the underlying clock gets
there and when :meth:`Timekeeper.advance` moves time past the deadline — so a test with a
frozen fake clock releases a waiting request by advancing, never by sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import anyio


class Timekeeper:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._offset = 0.0
        self._tick: anyio.Event | None = None
        self._blocked = 0
        self._blocked_changed: anyio.Event | None = None

    def now(self) -> float:
        return self._clock() + self._offset

    def wall(self) -> float:
        """Seconds since the epoch, moved by :meth:`advance` too: a ``Retry-After`` date says
        the same wait as the seconds form, however far a test has moved emulator time."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"can only advance by a finite, non-negative number of seconds, not {seconds}"
            )
        self._offset += seconds
        if self._tick is not None:
            self._tick.set()
            self._tick = None

    @property
    def blocked(self) -> int:
        """How many requests are currently waiting for emulator time to pass."""
        return self._blocked

    async def sleep_until(self, deadline: float) -> None:
        self._set_blocked(self._blocked + 1)
        try:
            while (remaining := deadline - self.now()) > 0:
                if self._tick is None:
                    self._tick = anyio.Event()
                with anyio.move_on_after(remaining):
                    await self._tick.wait()
        finally:
            self._set_blocked(self._blocked - 1)

    async def wait_blocked(self, count: int = 1) -> None:
        """Return once at least ``count`` requests wait in :meth:`sleep_until`."""
        while self._blocked < count:
            if self._blocked_changed is None:
                self._blocked_changed = anyio.Event()
            await self._blocked_changed.wait()

    def _set_blocked(self, count: int) -> None:
        self._blocked = count
        if self._blocked_changed is not None:
            self._blocked_changed.set()
            self._blocked_changed = None
