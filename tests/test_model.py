"""A model of the runner's life: files arrive, the runner is started and killed at arbitrary
moments, bem's faults change and its time moves on — and after every step nothing has been sent
twice, no document is doubled, half-written or unexplained, and the database is sound. At the
end, one more drain delivers every file exactly once.

The runner runs in-process against the emulator's ASGI app; a "kill" cancels it after it has
made a chosen number of requests (so the moment depends on the pipeline's progress, not on
wall-clock luck), which still leaves POSTs, polls and deliveries cut off half-way.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runner.clock import FakeClock
from runner.config import Config
from runner.daemon import Runner, RunnerOptions
from runner.emulator import Emulator, EmulatorSettings

from .conftest import TEMP_ROOT
from .fake_time import TimeMachine, fake_clock
from .pipeline import SUPERVISE_EVERY, drain, leftover_temporaries, make_config, outbox_documents

FAULT_MODES: dict[str, dict[str, float]] = {
    "calm": {},
    "5xx": {"error_5xx_rate": 0.5},
    "accept-then-500": {"accept_then_500_rate": 0.7},
    "dropped": {"drop_rate": 0.5},
    "everything": {"error_5xx_rate": 0.2, "accept_then_500_rate": 0.3, "drop_rate": 0.2},
}
NO_FAULTS = {"error_5xx_rate": 0.0, "accept_then_500_rate": 0.0, "drop_rate": 0.0}
RUN_LIMIT_SECONDS = 10.0


def total_requests(emulator: Emulator) -> int:
    stats = emulator.stats()
    return sum(sum(statuses.values()) for statuses in stats["requests"].values())


class KillSwitch(httpx.AsyncBaseTransport):
    """The emulator's transport, which sets ``tripped`` once ``requests`` have been answered."""

    def __init__(self, emulator: Emulator, requests: int) -> None:
        self._inner = httpx.ASGITransport(app=emulator.app)
        self._left = requests
        self.tripped = anyio.Event()
        if requests <= 0:
            self.tripped.set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        self._left -= 1
        if self._left <= 0:
            self.tripped.set()
        return response


async def run_until_killed(
    config: Config, emulator: Emulator, clock: FakeClock, requests: int
) -> None:
    """Run the runner on ``clock`` until it has made ``requests`` more requests (or ended), then
    cancel it. Emulator time is the model's to move: it does not follow the clock."""
    switch = KillSwitch(emulator, requests)
    runner = Runner(
        config,
        RunnerOptions(drain=True, handle_signals=False, supervise_every=SUPERVISE_EVERY),
        clock=clock,
        transport=switch,
        events=None,
    )

    async def serve() -> None:
        await runner.serve()
        switch.tripped.set()

    with anyio.fail_after(RUN_LIMIT_SECONDS):
        async with anyio.create_task_group() as tg:
            tg.start_soon(TimeMachine(clock).keep_moving)
            tg.start_soon(serve)
            await switch.tripped.wait()
            tg.cancel_scope.cancel()


class RunnerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # where tmp_path lives (tests/conftest.py), though hypothesis examples cannot use it
        self.root = Path(tempfile.mkdtemp(prefix="bem-model-", dir=os.environ.get(TEMP_ROOT)))
        # emulator time stands still unless a step moves it, until the final drain
        self.live_since: float | None = None
        self.emulator = Emulator(
            EmulatorSettings(latency_min=1.0, latency_max=3.0, seed=5), clock=self.emulator_clock
        )
        self.config = make_config(
            self.root,
            api={"visibility_window": "0.2s", "timeout_seconds": 5},
            poll={"initial_seconds": 0.01, "max_seconds": 0.05},
        )
        self.written: dict[str, bytes] = {}
        self.runs = 0
        self.clock = fake_clock()
        """The runner's time, across all its runs."""

    def emulator_clock(self) -> float:
        if self.live_since is None:
            return 0.0
        return (time.monotonic() - self.live_since) * 100

    @rule(
        loose=st.integers(min_value=0, max_value=3),
        batch=st.integers(min_value=0, max_value=3),
    )
    def add_files(self, loose: int, batch: int) -> None:
        n = len(self.written)
        files = [(f"wf-{i % 2}/loose-{n}-{i}.txt", i) for i in range(loose)]
        files += [(f"wf-b/batch-{n}/item-{i}.csv", i) for i in range(batch)]
        for rel, i in files:
            path = self.config.paths.inbox / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            content = f"{rel} {i}".encode()
            path.write_bytes(content)
            self.written[rel] = content

    @rule(requests=st.integers(min_value=0, max_value=12))
    def run_then_kill(self, requests: int) -> None:
        self.runs += 1
        self.clock = later_clock(self.clock)
        anyio.run(run_until_killed, self.config, self.emulator, self.clock, requests)

    @rule(mode=st.sampled_from(sorted(FAULT_MODES)))
    def switch_faults(self, mode: str) -> None:
        self.emulator.update(**{**NO_FAULTS, **FAULT_MODES[mode]})

    @rule(seconds=st.sampled_from([0.5, 2.0, 10.0]))
    def advance_clock(self, seconds: float) -> None:
        self.emulator.advance(seconds)

    @precondition(lambda self: self.runs > 0)
    @invariant()
    def nothing_sent_twice_nothing_doubled(self) -> None:
        stats = self.emulator.stats()
        assert all(n == 1 for n in stats["calls_by_reference"].values())
        assert all(n == 1 for n in stats["files_by_content_sha256"].values())
        documents = outbox_documents(self.config.paths.outbox)  # asserts one per file
        assert set(documents) <= set(self.written)
        assert leftover_temporaries(self.config.paths.outbox) == []
        assert integrity(self.config.paths.state) == "ok"

    def teardown(self) -> None:
        try:
            if self.written:
                self.everything_arrives_in_the_end()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def everything_arrives_in_the_end(self) -> None:
        self.emulator.update(**NO_FAULTS)
        self.live_since = time.monotonic()

        self.clock = later_clock(self.clock)

        async def final() -> Any:
            with anyio.fail_after(10):
                return await drain(self.config, self.emulator, clock=self.clock)

        anyio.run(final)
        documents = outbox_documents(self.config.paths.outbox)
        assert sorted(documents) == sorted(self.written)
        assert {kind for kind, _ in documents.values()} == {"result"}
        stats = self.emulator.stats()
        assert all(n == 1 for n in stats["calls_by_reference"].values())
        assert sorted(stats["files_by_content_sha256"].values()) == [1] * len(self.written)


def later_clock(clock: FakeClock) -> FakeClock:
    """A fake clock that goes on from where ``clock`` stands, for a new event loop (a clock's
    wake-ups belong to the loop it first ran on)."""
    return FakeClock(clock.now(), wall_start=clock.wall())


def integrity(state: Path) -> str:
    if not state.exists():
        return "ok"
    connection = sqlite3.connect(state)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


TestRunnerModel = RunnerModel.TestCase
TestRunnerModel.settings = settings(
    max_examples=40,
    stateful_step_count=12,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
