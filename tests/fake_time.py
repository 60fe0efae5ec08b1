"""Driving a whole runner (or one stage) on :class:`runner.clock.FakeClock`.

:class:`TimeMachine` runs an operation while moving the fake clock to the next sleeper's
deadline whenever the tasks on the event loop have stopped making progress; the emulator's time
is moved by the same amount, so the runner and bem agree on how much time has passed. Work done
in threads (SQLite, scanning, hashing) is invisible to the clock, so time may move on while a
thread is busy: that is a slow machine, which the runner must handle anyway.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.lowlevel

from runner.clock import FakeClock
from runner.emulator import Emulator

T = TypeVar("T")

QUIET_CHECKPOINTS = 8
"""Turns of the event loop with no change in the sleepers before the clock moves on."""


def fake_clock() -> FakeClock:
    """A fake clock whose wall time starts now, so real file mtimes are in its recent past."""
    return FakeClock(wall_start=time.time())


class TimeMachine:
    """Moves ``clock`` (and the emulators' time with it) while an operation runs."""

    def __init__(self, clock: FakeClock, *emulators: Emulator) -> None:
        self.clock = clock
        self.emulators = emulators
        self.moved = 0.0
        """Fake seconds this machine has moved the clock by."""

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()``'s result; its error is raised as it is, not in an exception group."""
        result: list[T] = []
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._keep_moving)

                async def run_operation() -> None:
                    try:
                        result.append(await operation())
                    finally:
                        tasks.cancel_scope.cancel()

                tasks.start_soon(run_operation)
        except ExceptionGroup as group:
            [error] = group.exceptions
            raise error from error.__cause__
        [value] = result
        return value

    async def _keep_moving(self) -> None:
        while True:
            await self.clock.wait_for_sleepers(1)
            await self._until_quiet()
            deadline = self.clock.next_deadline
            if deadline is not None:
                self.advance(max(0.0, deadline - self.clock.now()))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.moved += seconds
        for emulator in self.emulators:
            emulator.advance(seconds)

    async def _until_quiet(self) -> None:
        """Until the number of sleepers has not changed for a few turns of the event loop."""
        quiet = 0
        sleepers = self.clock.sleepers
        while quiet < QUIET_CHECKPOINTS:
            await anyio.lowlevel.checkpoint()
            if self.clock.sleepers == sleepers:
                quiet += 1
            else:
                quiet, sleepers = 0, self.clock.sleepers
