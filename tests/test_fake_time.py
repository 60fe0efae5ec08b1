"""The test driver's time machine: the fake clock moves only when nothing could make progress."""

from __future__ import annotations

import _thread
import os
import threading

import anyio
import pytest

from runner.clock import FakeClock

from .fake_time import TimeMachine

pytestmark = pytest.mark.anyio

HANG_GUARD_SECONDS = 10.0
"""Real seconds after which a machine that never moves the clock is a failure, not a wait."""


async def sleep_and_tell(clock: FakeClock, seconds: float) -> float:
    await clock.sleep(seconds)
    return clock.now()


async def test_a_thread_started_beneath_threading_does_not_hold_the_clock() -> None:
    """As pytest-xdist's channel reader, which waits in a pipe read for the whole session."""
    read_end, write_end = os.pipe()
    reading = threading.Event()
    done = threading.Event()

    def read_forever() -> None:
        reading.set()
        os.read(read_end, 1)
        done.set()

    _thread.start_new_thread(read_forever, ())
    assert reading.wait(HANG_GUARD_SECONDS)
    try:
        clock = FakeClock()
        with anyio.fail_after(HANG_GUARD_SECONDS):
            assert await TimeMachine(clock).run(lambda: sleep_and_tell(clock, 60.0)) == 60.0
    finally:
        os.write(write_end, b"x")
        done.wait(HANG_GUARD_SECONDS)
        os.close(read_end)
        os.close(write_end)


async def test_the_clock_stands_while_a_worker_thread_works() -> None:
    clock = FakeClock()
    seen: list[float] = []

    def work() -> None:
        for _ in range(20_000):
            seen.append(clock.now())

    async def operation() -> float:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(clock.sleep, 10.0)  # a deadline the machine could jump to
            await anyio.to_thread.run_sync(work)
            at_end = clock.now()
            tasks.cancel_scope.cancel()
        return at_end

    with anyio.fail_after(HANG_GUARD_SECONDS):
        assert await TimeMachine(clock).run(operation) == 0.0
    assert set(seen) == {0.0}


class FailingMachine(TimeMachine):
    """A machine whose look at the threads fails the second time it looks."""

    looks = 0

    async def _until_quiet(self) -> None:
        self.looks += 1
        if self.looks == 2:
            raise RuntimeError("the machine broke")
        await super()._until_quiet()


async def test_a_machine_that_fails_fails_the_test_even_when_shutdown_waits_on_the_clock() -> None:
    clock = FakeClock()
    slept: list[float] = []

    async def operation() -> None:
        try:
            await clock.sleep(1)  # the machine moves the clock once, then breaks
            await clock.sleep(1)
        finally:
            with anyio.CancelScope(shield=True):  # a graceful stop, timed on the clock
                await clock.sleep(30)
                slept.append(clock.now())

    with anyio.fail_after(HANG_GUARD_SECONDS), pytest.raises(RuntimeError, match="broke"):
        await FailingMachine(clock).run(operation)
    assert slept == [31.0]
