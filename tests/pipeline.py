"""Helpers for end-to-end tests: a real Runner against the emulator, real SQLite, real files."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import msgspec.structs

from runner.clock import FakeClock
from runner.config import Config, load_config
from runner.daemon import Outcome, Runner, RunnerOptions
from runner.emulator import Emulator
from runner.route import Route
from runner.watch import EventSource

from .fake_time import UNTIL_REAL_SECONDS, TimeMachine, fake_clock

API_KEY = "emulator-key"
SUPERVISE_EVERY = 1.0
"""Fake seconds between the supervisor's looks when nothing nudges it: free on a fake clock, and
each look costs real time."""


def make_config(
    root: Path, base_url: str = "http://emulator", /, **sections: dict[str, Any]
) -> Config:
    raw: dict[str, Any] = {
        "paths.inbox": str(root / "inbox"),
        "paths.outbox": str(root / "outbox"),
        "paths.archive": str(root / "archive"),
        "paths.state": str(root / "state.db"),
        "api.base_url": base_url,
        "inbox.settle_seconds": 0,
        "poll.initial_seconds": 0.02,
        "poll.max_seconds": 0.2,
        "limits.requests_per_second": 1000,
        "limits.burst": 100,
    }
    for section, values in sections.items():
        for key, value in values.items():
            raw[f"{section}.{key}"] = value
    routes = raw.pop("route.list", None)
    config = load_config(None, environ={"BEM_API_KEY": API_KEY}, overrides=raw)
    if routes:
        parsed = msgspec.convert(routes, tuple[Route, ...], strict=True)
        config = msgspec.structs.replace(config, route=parsed)
    return config


async def drain(
    config: Config, emulator: Emulator, *, clock: FakeClock | None = None, **options: Any
) -> Outcome:
    """A whole drain on a fake clock that moves, with the emulator's time, whenever the runner
    waits: no test waits for real time to pass."""
    clock = clock or fake_clock()
    runner = Runner(
        config,
        RunnerOptions(drain=True, handle_signals=False, supervise_every=SUPERVISE_EVERY, **options),
        clock=clock,
        transport=httpx.ASGITransport(app=emulator.app),
        events=None,
    )
    return await TimeMachine(clock, emulator).run(runner.serve)


@dataclass
class Running:
    """A runner serving (not draining) on a fake clock, and the machine that moves that clock."""

    runner: Runner
    machine: TimeMachine

    @property
    def clock(self) -> FakeClock:
        return self.machine.clock

    async def until(self, condition: Callable[[], bool], *, within: float = 3600.0) -> None:
        await self.machine.until(condition, within=within)


@asynccontextmanager
async def running(
    config: Config,
    emulator: Emulator,
    *,
    events: EventSource | None = None,
    emulator_follows: bool = True,
    **options: Any,
) -> AsyncIterator[Running]:
    """Serve on a fake clock for the body of the ``async with``, then stop and wait for the end.

    The emulator's time follows the fake clock unless ``emulator_follows`` is false (the test
    then moves it itself). A wait in the body is ``await running.clock.sleep(...)``, in fake time.
    """
    clock = fake_clock()
    machine = TimeMachine(clock, *([emulator] if emulator_follows else []))
    runner = Runner(
        config,
        RunnerOptions(
            drain=False, handle_signals=False, supervise_every=SUPERVISE_EVERY, **options
        ),
        clock=clock,
        transport=httpx.ASGITransport(app=emulator.app),
        events=events,
    )
    served = anyio.Event()

    async def serve() -> None:
        try:
            await runner.serve()
        finally:
            served.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(machine.keep_moving)
        tg.start_soon(serve)
        yield Running(runner, machine)
        runner.should_exit = True
        with anyio.fail_after(UNTIL_REAL_SECONDS):
            await served.wait()
        tg.cancel_scope.cancel()


async def drain_on_real_time(config: Config, emulator: Emulator, **options: Any) -> Outcome:
    """A whole drain on the system clock, for the tests whose point is real time."""
    runner = Runner(
        config,
        RunnerOptions(drain=True, handle_signals=False, supervise_every=0.05, **options),
        transport=httpx.ASGITransport(app=emulator.app),
        events=None,
    )
    return await runner.serve()


async def drain_through(
    config: Config, answer: Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]
) -> Outcome:
    """A whole drain on the system clock against a stand-in bem: ``answer`` answers each
    request (often the emulator's answer, changed)."""
    runner = Runner(
        config,
        RunnerOptions(drain=True, handle_signals=False, supervise_every=0.05),
        transport=httpx.MockTransport(answer),
        events=None,
    )
    return await runner.serve()


def write_files(inbox: Path, files: Iterable[tuple[str, bytes]]) -> list[str]:
    rels = []
    for rel, content in files:
        path = inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        rels.append(rel)
    return rels


def outbox_documents(outbox: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """input rel path → ("result" | "error", document)."""
    documents: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in sorted(outbox.rglob("*.json")):
        rel = path.relative_to(outbox).as_posix()
        if rel.endswith(".error.json"):
            key, kind = rel.removesuffix(".error.json"), "error"
        else:
            key, kind = rel.removesuffix(".json"), "result"
        assert key not in documents, f"two documents for {key}"
        documents[key] = (kind, json.loads(path.read_text()))
    return documents


def leftover_temporaries(outbox: Path) -> list[Path]:
    return [p for p in outbox.rglob("*") if p.name.endswith(".tmp")]
