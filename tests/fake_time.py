"""Driving a whole runner (or one stage) on :class:`runner.clock.FakeClock`.

:class:`TimeMachine` runs an operation while moving the fake clock to the next sleeper's
deadline whenever nothing else can make progress: every task on the event loop waits, and every
other thread (SQLite's, anyio's workers) waits for work. The emulator's time is moved by the same
amount, so the runner and bem agree on how much time has passed.

Telling "waits" from "works" needs a look inside asyncio tasks and thread stacks; that is what a
test driver may do and the runner never does.
"""

from __future__ import annotations

import asyncio
import linecache
import queue
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TypeVar

import anyio
import anyio.lowlevel

from runner.clock import FakeClock
from runner.emulator import Emulator

T = TypeVar("T")

QUIET_CHECKPOINTS = 4
"""Turns of the event loop in a row in which nothing could run before the clock moves on."""
BLOCKING_CALLS = (".get(", ".wait(", ".acquire(")
"""A thread whose innermost Python line makes one of these calls is waiting for work."""
THREAD_POLL_SECONDS = 0.0005
"""While another thread works, how often the machine looks again. Only how soon the clock
moves depends on it, never what a test sees: the clock never moves while a thread works."""
UNTIL_FAKE_SECONDS = 3600.0
"""How much fake time :meth:`TimeMachine.until` gives a condition by default."""
UNTIL_REAL_SECONDS = 60.0
"""A hang guard, not a wait: no condition may take longer than this in real time."""


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
        self._advanced = anyio.Event()

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()``'s result; its error is raised as it is, not in an exception group."""
        result: list[T] = []
        stopped: list[BaseException] = []
        operation_scope = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._keep_moving_or_wind_down, operation_scope, stopped)

                async def run_operation() -> None:
                    try:
                        with operation_scope:
                            result.append(await operation())
                    finally:
                        tasks.cancel_scope.cancel()

                tasks.start_soon(run_operation)
        except ExceptionGroup as group:
            [error] = group.exceptions
            raise error from error.__cause__
        if stopped:  # the machine itself failed: say so, whatever the operation did meanwhile
            raise stopped[0]
        [value] = result
        return value

    async def _keep_moving_or_wind_down(
        self, operation_scope: anyio.CancelScope, stopped: list[BaseException]
    ) -> None:
        """:meth:`keep_moving`; should it fail, the operation is cancelled and the clock keeps
        moving until the operation has ended: its shutdown may wait on the fake clock (shielded),
        and a test must fail, not hang."""
        try:
            await self.keep_moving()
        except Exception as exc:
            stopped.append(exc)
            operation_scope.cancel()
            while True:
                await anyio.sleep(THREAD_POLL_SECONDS)
                deadline = self.clock.next_deadline
                if deadline is not None:
                    self.advance(max(0.0, deadline - self.clock.now()))

    async def keep_moving(self) -> None:
        """Forever: once the event loop is quiet, move the clock to the next deadline."""
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
        self._advanced.set()
        self._advanced = anyio.Event()

    async def until(
        self, condition: Callable[[], bool], *, within: float = UNTIL_FAKE_SECONDS
    ) -> None:
        """Until ``condition()`` holds, looked at each time the clock moves; an AssertionError
        once ``within`` fake seconds have passed without it."""
        deadline = self.clock.now() + within
        with anyio.fail_after(UNTIL_REAL_SECONDS):
            while not condition():
                if self.clock.now() > deadline:
                    raise AssertionError(f"not so within {within} s of fake time")
                await self._advanced.wait()

    async def _until_quiet(self) -> None:
        """Until nothing but this task could run, for a few turns of the event loop in a row."""
        quiet = 0
        while quiet < QUIET_CHECKPOINTS:
            await anyio.lowlevel.checkpoint()
            if not _all_threads_wait():
                quiet = 0
                await anyio.sleep(THREAD_POLL_SECONDS)
            elif _all_tasks_wait():
                quiet += 1
            else:
                quiet = 0


def _all_tasks_wait() -> bool:
    """Whether every other task on this event loop waits on a future not yet done."""
    this = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is this:
            continue
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        if waiter is None or waiter.done():
            return False
    return True


def _all_threads_wait() -> bool:
    """Whether every other thread started with :mod:`threading` (anyio's workers, executors)
    is blocked waiting for work (a queue, lock or condition) and has none queued.

    Threads started beneath :mod:`threading` belong to the test driver and never work for the
    event loop: pytest-xdist's channel reader sits in a pipe read for the whole session, and
    counting it as busy would keep the clock from ever moving.
    """
    me = threading.get_ident()
    frames = sys._current_frames()
    return all(
        _blocked(frames[thread.ident]) and not _work_queued_for(thread)
        for thread in threading.enumerate()
        if thread.ident is not None
        and thread.ident != me
        and thread.ident in frames
        and not isinstance(thread, threading._DummyThread)
    )


def _blocked(frame: FrameType) -> bool:
    """Whether the thread's innermost Python line is a call that blocks for work. Only the line
    is read: another thread's ``f_locals`` is not safe to touch while that thread may run."""
    lineno = frame.f_lineno  # None while the thread is between lines: it is working
    if lineno is None:
        return False
    line = linecache.getline(frame.f_code.co_filename, lineno)
    return any(call in line for call in BLOCKING_CALLS)


def _work_queued_for(thread: threading.Thread) -> bool:
    """Whether a queue the thread takes its work from holds some (a thread woken by ``put`` may
    not have run yet). anyio's worker keeps its queue as an attribute; an executor's worker is
    handed it as an argument."""
    attributes = vars(thread)
    held = [*attributes.values(), *attributes.get("_args", ())]
    return any(isinstance(v, queue.Queue | queue.SimpleQueue) and not v.empty() for v in held)
