"""The crash harness on a shared PostgreSQL store: two ``python -m runner run`` on one store and
one inbox against the emulator; one is SIGKILLed at a named crash point (on its first hit) while
the other runs on and, once the dead one's lease has passed, finishes its work. Then every file
has exactly one document, bem saw one call per ``callReferenceID``, no temporary is left and
the store holds nothing unfinished.

Every named crash point is swept, in the default suite (about 35 s on 2 cores).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import anyio
import anyio.abc
import pytest

from runner.emulator import serve_emulator

from .harness import KILLED, Workspace
from .test_crash import SWEEP_TRIES, SWEPT_POINTS, UNKNOWN_ONLY_POINTS, quick_emulator, sweep_files
from .test_several_runners import (
    DEADLINE_SECONDS,
    check_exactly_once,
    everything_delivered,
    start_runner,
    started,
    until,
)

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]

SWEEP_LEASE_SECONDS = 2.0
"""Short, so the live runner takes a dead one's work over soon; a live runner that misses its
heartbeats for that long on a loaded machine joins again, harmlessly."""


def shared_workspace(root: Path, base_url: str) -> Workspace:
    space = Workspace(root, base_url)
    space.settings = {
        "api": {"visibility_window": "0.4s"},
        "store": {"lease_seconds": SWEEP_LEASE_SECONDS},
    }
    space.write_config()
    return space


async def crash_one(
    space: Workspace, store_url: str, spec: str, tag: str, seed: int, steady: anyio.abc.Process
) -> bool:
    """Start a runner that crashes at ``spec`` and give it new files once it is up, the steady
    runner frozen meanwhile (SIGSTOP) so that the new work reaches the crashing one; whether it
    crashed there (else it is stopped once every file is delivered). The steady runner goes on
    after: declared dead while frozen, it joins again and takes the crashed runner's work over."""
    crashing = await start_runner(space, store_url, crash_at=spec)
    await until("the crashing runner started", space, lambda: started(space) >= space.runs)
    steady.send_signal(signal.SIGSTOP)
    try:
        for rel, content in sweep_files(random.Random(seed), tag):
            space.drop(rel, content)
        return await _crashed_or_finished(space, crashing, spec)
    finally:
        steady.send_signal(signal.SIGCONT)


async def _crashed_or_finished(space: Workspace, crashing: anyio.abc.Process, spec: str) -> bool:

    def settled() -> bool:
        return crashing.returncode is not None or everything_delivered(space)

    try:
        await until(f"{spec}: crashed or every file delivered", space, settled)
    finally:
        if crashing.returncode is None:
            crashing.send_signal(signal.SIGTERM)
        with anyio.fail_after(DEADLINE_SECONDS):
            code = await crashing.wait()
    assert code in (KILLED, 0), space.log.read_text()[-4000:]
    return code == KILLED


async def shared_sweep(root: Path, store_url: str, points: tuple[str, ...], seed: int) -> None:
    served = quick_emulator(seed)
    reached: set[str] = set()
    async with serve_emulator(served) as base_url:
        space = shared_workspace(root, base_url)
        steady = await start_runner(space, store_url)
        try:
            for index, point in enumerate(points):
                spec = f"{point}:1"
                # a point a runner meets only on some paths (a poll that finds its call still
                # running, say) gets a few tries
                for attempt in range(SWEEP_TRIES):
                    tag = f"{index}-{attempt}"
                    if await crash_one(space, store_url, spec, tag, seed * 1000 + index, steady):
                        reached.add(point)
                        break
            await until("every file delivered", space, lambda: everything_delivered(space))
        finally:
            if steady.returncode is None:
                steady.send_signal(signal.SIGTERM)
            with anyio.fail_after(DEADLINE_SECONDS):
                code = await steady.wait()
        assert code == 0, space.log.read_text()[-4000:]
        check_exactly_once(space, served, store_url)
    log = space.log.read_text()
    assert "Traceback" not in log
    must_reach = {p for p in points if p not in UNKNOWN_ONLY_POINTS}
    assert must_reach - reached == set(), log[-4000:]


async def test_a_runner_crashing_at_every_named_point_while_another_runs_on(
    tmp_path: Path, postgres_url: str
) -> None:
    await shared_sweep(tmp_path, postgres_url, SWEPT_POINTS, seed=22)
