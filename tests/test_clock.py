from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest

from runner.clock import Clock, FakeClock, SystemClock
from runner.context import Nudge


def test_both_clocks_satisfy_the_protocol() -> None:
    clocks: list[Clock] = [SystemClock(), FakeClock()]
    assert all(isinstance(clock.now(), float) for clock in clocks)


def test_system_clock_reads_monotonic_and_wall_time() -> None:
    clock = SystemClock()
    before_wall, before_mono = time.time(), time.monotonic()
    wall, now = clock.wall(), clock.now()
    after_wall, after_mono = time.time(), time.monotonic()
    assert before_wall <= wall <= after_wall
    assert before_mono <= now <= after_mono


@pytest.mark.anyio
async def test_system_clock_sleep_of_zero_or_less_returns() -> None:
    clock = SystemClock()
    await clock.sleep(0)
    await clock.sleep(-5)
    assert clock.now() > 0


def test_fake_clock_starts_where_told_and_moves_only_when_advanced() -> None:
    clock = FakeClock(100.0, wall_start=1_000_000.0)
    assert (clock.now(), clock.wall()) == (100.0, 1_000_000.0)
    assert clock.now() == 100.0  # reading does not move it
    clock.advance(2.5)
    assert (clock.now(), clock.wall()) == (102.5, 1_000_002.5)
    clock.advance_to(110.0)
    assert (clock.now(), clock.wall()) == (110.0, 1_000_010.0)


def test_fake_clock_refuses_to_go_backwards() -> None:
    clock = FakeClock(5.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance_to(4.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(float("nan"))
    assert clock.now() == 5.0


@pytest.mark.anyio
async def test_sleeper_wakes_exactly_when_its_deadline_is_reached() -> None:
    clock = FakeClock()
    woke_at: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(3.0)
        woke_at.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await clock.wait_for_sleepers(1)
        assert clock.next_deadline == 3.0
        clock.advance(2.999)
        assert clock.sleepers == 1
        await anyio.lowlevel.checkpoint()
        assert woke_at == []
        clock.advance(0.001)
        assert clock.sleepers == 0  # counted out at once, before the task runs
    assert woke_at == [3.0]


@pytest.mark.anyio
async def test_advance_wakes_every_due_sleeper_in_deadline_order() -> None:
    clock = FakeClock()
    order: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        order.append(name)

    async with anyio.create_task_group() as tg:
        for name, seconds in [("c", 3.0), ("a", 1.0), ("late", 10.0), ("b", 2.0), ("a2", 1.0)]:
            tg.start_soon(sleeper, name, seconds)
        await clock.wait_for_sleepers(5)
        clock.advance(5.0)
        assert clock.sleepers == 1
        assert clock.next_deadline == 10.0
        await clock.wait_for_sleepers(1)  # already true: returns at once
        assert clock.advance_to_next_deadline() == 10.0
    assert order == ["a", "a2", "b", "c", "late"]
    assert clock.now() == 10.0


def test_advance_to_next_deadline_without_sleepers_does_nothing() -> None:
    clock = FakeClock(7.0)
    assert clock.advance_to_next_deadline() is None
    assert clock.next_deadline is None
    assert clock.now() == 7.0


@pytest.mark.anyio
async def test_sleep_of_zero_or_less_yields_exactly_once() -> None:
    clock = FakeClock()
    events: list[str] = []

    async def yielder(seconds: float) -> None:
        events.append(f"before {seconds}")
        await clock.sleep(seconds)
        events.append(f"after {seconds}")

    async def other() -> None:
        events.append("other")

    async with anyio.create_task_group() as tg:
        tg.start_soon(yielder, 0.0)
        tg.start_soon(yielder, -1.0)
        tg.start_soon(other)
    assert events == ["before 0.0", "before -1.0", "other", "after 0.0", "after -1.0"]
    assert clock.sleepers == 0
    assert clock.now() == 0.0


@pytest.mark.anyio
async def test_sleep_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        await FakeClock().sleep(float("nan"))


@pytest.mark.anyio
async def test_cancelled_sleeper_is_forgotten() -> None:
    clock = FakeClock()
    finished: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        finished.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper, "kept", 2.0)
        async with anyio.create_task_group() as inner:
            inner.start_soon(sleeper, "cancelled", 1.0)
            await clock.wait_for_sleepers(2)
            inner.cancel_scope.cancel()
        assert clock.sleepers == 1
        assert clock.next_deadline == 2.0
        clock.advance(2.0)
    assert finished == ["kept"]


@pytest.mark.anyio
async def test_wait_for_sleepers_waits_for_woken_tasks_to_sleep_again() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def ticker() -> None:
        for _ in range(3):
            await clock.sleep(1.0)
            ticks.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        for expected in (1.0, 2.0):
            await clock.wait_for_sleepers(1)
            clock.advance(1.0)
            await clock.wait_for_sleepers(1)
            assert ticks[-1] == expected
        clock.advance(1.0)
    assert ticks == [1.0, 2.0, 3.0]


@pytest.mark.anyio
async def test_wait_for_sleepers_can_wait_for_several() -> None:
    clock = FakeClock()
    async with anyio.create_task_group() as tg:
        for seconds in (1.0, 2.0, 3.0):
            tg.start_soon(clock.sleep, seconds)
        await clock.wait_for_sleepers(3)
        assert clock.sleepers == 3
        clock.advance(3.0)
    assert clock.sleepers == 0


def test_fake_clock_can_be_made_outside_an_event_loop() -> None:
    clock = FakeClock(1.0)

    async def main() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(clock.sleep, 1.0)
            await clock.wait_for_sleepers(1)
            clock.advance(1.0)
        return clock.now()

    assert anyio.run(main, backend="asyncio") == 2.0


# -- a stage's wake-up ---------------------------------------------------------------------


async def _waits_then_reports(
    nudge: Nudge, at_most: float, woke: list[float], clock: FakeClock
) -> None:
    await nudge.wait(at_most)
    woke.append(clock.wall())


@pytest.mark.anyio
async def test_work_due_later_than_a_stage_looks_again_does_not_wake_it() -> None:
    clock = FakeClock(0.0, wall_start=1000.0)
    nudge = Nudge(clock)
    woke: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_waits_then_reports, nudge, 10.0, woke, clock)
        await clock.wait_for_sleepers(1)
        nudge.set_unless_due_later(1010.0)  # it looks again at 1010 anyway
        nudge.set_unless_due_later(1020.0)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        nudge.set_unless_due_later(1009.5)  # sooner than it would look: woken now
    assert woke == [1000.0]


@pytest.mark.anyio
async def test_work_due_at_any_time_wakes_a_stage_that_is_not_waiting() -> None:
    # awake, the stage may have read the store before the work was written: it looks again
    clock = FakeClock(0.0, wall_start=1000.0)
    nudge = Nudge(clock)
    nudge.set_unless_due_later(1e12)
    with anyio.fail_after(5):
        await nudge.wait(3600.0)  # returns at once, no time passed
    assert clock.now() == 0.0
