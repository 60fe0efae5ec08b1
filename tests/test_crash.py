"""Crash harness: the runner is SIGKILLed at random moments and at every named crash point,
restarted, and finally drained; nothing may be lost, sent twice or left half-written.

The long soak is ``pytest -m slow tests/test_crash.py`` (thousands of files, hundreds of kills);
``CRASH_SOAK_FILES``, ``CRASH_SOAK_KILLS`` and ``CRASH_SOAK_SEED`` scale it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from runner import faults
from runner.emulator import Emulator, EmulatorSettings, serve_emulator

from .harness import (
    API_KEY,
    KILLED,
    Workspace,
    check_invariants,
    integrity_check,
    kill_after,
    run,
    start,
    status_json,
    unique_files,
)

pytestmark = pytest.mark.anyio

STORE_COMMITS = (
    "add_files",
    "close_batch",
    "mark_sending",
    "mark_submitted",
    "reschedule_poll",
    "mark_terminal",
    "mark_delivered",
    "mark_done",
)
"""The store's commits on the way of every file (``store.{before,after}_commit.<name>``)."""

PIPELINE_POINTS = tuple(p for p in faults.POINTS if not p.startswith("store."))
SWEPT_POINTS = (
    *(f"store.{when}_commit.{name}" for name in STORE_COMMITS for when in ("before", "after")),
    *PIPELINE_POINTS,
)
UNKNOWN_ONLY_POINTS = ("submit.before_list", "submit.after_list")
"""Passed only while resolving an unknown outcome, i.e. after an earlier crash mid-POST."""
KILL_AFTER_SECONDS = (0.2, 1.2)
"""How long a ``run`` lives before its SIGKILL: from inside its startup to after its files'
calls have finished (they take at most 0.6 s); a longer life mostly kills an idle runner."""
SWEEP_TRIES = 3


def faulty_emulator(seed: int) -> Emulator:
    """Calls take a little while, and a few POSTs are accepted but answered 500 or dropped."""
    return Emulator(
        EmulatorSettings(
            api_key=API_KEY,
            latency_min=0.05,
            latency_max=0.6,
            accept_then_500_rate=0.05,
            drop_rate=0.03,
            list_visibility_lag=0.2,
            seed=seed,
        )
    )


def quick_emulator(seed: int) -> Emulator:
    """Calls finish soon and new ones are listed after a short lag; the crash is the fault.

    A call takes longer than the first poll comes (``poll.initial_seconds`` is 0.05), so every
    run reschedules a poll as well as finishing calls.
    """
    return Emulator(
        EmulatorSettings(
            api_key=API_KEY,
            latency_min=0.15,
            latency_max=0.3,
            list_visibility_lag=0.1,
            seed=seed,
        )
    )


@dataclass
class SoakFigures:
    files: int
    kills: int
    runs: int
    calls: int
    faults: dict[str, int]


async def random_kill_soak(root: Path, *, files: int, kills: int, seed: int) -> SoakFigures:
    """Drop files, start ``run``, SIGKILL it after a random while; repeat; then ``drain``."""
    rng = random.Random(seed)
    emulator = faulty_emulator(seed)
    async with serve_emulator(emulator) as base_url:
        workspace = Workspace(root, base_url)
        workspace.write_config()
        per_cycle = max(1, files // kills)
        for cycle in range(kills):
            for rel, content in unique_files(rng, cycle * per_cycle, per_cycle):
                workspace.drop(rel, content)
            process = await start(workspace, "run")
            code = await kill_after(process, rng.uniform(*KILL_AFTER_SECONDS))
            assert code == KILLED, workspace.log.read_text()[-3000:]
            if workspace.state.exists():
                assert integrity_check(workspace.state) == "ok"

        code = await run(workspace, "drain")

        assert code == 0, workspace.log.read_text()[-3000:]
        documents = check_invariants(workspace, emulator, await status_json(workspace))
        assert {kind for kind, _ in documents.values()} == {"result"}
        stats = emulator.stats()
        return SoakFigures(
            files=len(workspace.written),
            kills=kills,
            runs=workspace.runs,
            calls=stats["calls_total"],
            faults=stats["faults"],
        )


async def test_random_kills_lose_nothing_and_send_nothing_twice(tmp_path: Path) -> None:
    figures = await random_kill_soak(tmp_path, files=200, kills=20, seed=11)
    assert figures.files == 200
    assert figures.calls > 0


@pytest.mark.slow
@pytest.mark.timeout(0)  # minutes by design, scaled from the environment
async def test_random_kill_soak(tmp_path: Path) -> None:
    files = int(os.environ.get("CRASH_SOAK_FILES", "3000"))
    kills = int(os.environ.get("CRASH_SOAK_KILLS", "300"))
    seed = int(os.environ.get("CRASH_SOAK_SEED", "2024"))
    figures = await random_kill_soak(tmp_path, files=files, kills=kills, seed=seed)
    print(f"\ncrash soak: {figures}")
    assert figures.files == files


def sweep_files(rng: random.Random, tag: str) -> list[tuple[str, bytes]]:
    """Two loose files and a batch folder of two: every kind of call in every run."""
    rels = [f"wf-0/{tag}.txt", f"wf-1/{tag}.pdf", f"wf-b/{tag}/a.csv", f"wf-b/{tag}/b.json"]
    return [(rel, f"{rel} {rng.getrandbits(64):016x}".encode()) for rel in rels]


async def sweep(root: Path, specs: list[str], seed: int) -> set[str]:
    """Crash a ``drain`` at each ``point:hit``, with new files each time, then a final drain;
    returns the specs that were reached (the process was killed)."""
    rng = random.Random(seed)
    reached: set[str] = set()
    emulator = quick_emulator(seed)
    async with serve_emulator(emulator) as base_url:
        workspace = Workspace(root, base_url, {"api": {"visibility_window": "0.4s"}})
        workspace.write_config()
        for index, spec in enumerate(specs):
            # a point on the way of timing (a poll that finds its call still running) may be
            # missed on a loaded machine: a spec gets a few runs, each with new files
            for attempt in range(SWEEP_TRIES):
                for rel, content in sweep_files(rng, f"{index}-{attempt}"):
                    workspace.drop(rel, content)
                code = await run(workspace, "drain", crash_at=spec)
                assert code in (KILLED, 0), workspace.log.read_text()[-3000:]
                assert integrity_check(workspace.state) == "ok"
                if code == KILLED:
                    reached.add(spec)
                    break

        assert await run(workspace, "drain") == 0, workspace.log.read_text()[-3000:]
        check_invariants(workspace, emulator, await status_json(workspace))
    return reached


async def sweep_in_two_chains(root: Path, hits: tuple[int, ...]) -> None:
    """Two independent runners (one per core), each crashed at half of the points."""
    specs = [f"{point}:{hit}" for point in SWEPT_POINTS for hit in hits]
    halves = (specs[0::2], specs[1::2])
    reached: set[str] = set()

    async def chain(index: int) -> None:
        reached.update(await sweep(root / f"chain-{index}", halves[index], seed=index))

    async with anyio.create_task_group() as tg:
        for index in range(len(halves)):
            tg.start_soon(chain, index)

    must_reach = {f"{p}:1" for p in SWEPT_POINTS if p not in UNKNOWN_ONLY_POINTS}
    assert must_reach - reached == set()


async def test_every_named_crash_point_on_its_first_hit(tmp_path: Path) -> None:
    await sweep_in_two_chains(tmp_path, hits=(1,))


@pytest.mark.slow
@pytest.mark.timeout(0)  # minutes by design, scaled from the environment
async def test_every_named_crash_point_on_its_first_and_second_hit(tmp_path: Path) -> None:
    await sweep_in_two_chains(tmp_path, hits=(1, 2))
