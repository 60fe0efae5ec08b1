"""Shared pieces of the webhook tests: a runner with a receiver, the emulator over loopback."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from runner.config import Config, load_config
from runner.daemon import Outcome, Progress, Runner, RunnerOptions
from runner.emulator import Emulator, EmulatorSettings
from runner.store.base import Counts

API_KEY = "hooks-key"
SECRET = "whsec_current-secret-for-tests"
PREVIOUS_SECRET = "whsec_previous-secret-for-tests"
WORKFLOW = "wf"
FUNCTION = f"{WORKFLOW}-transform"


def hook_config(
    root: Path,
    base_url: str,
    port: int,
    *,
    environ: dict[str, str] | None = None,
    **sections: dict[str, Any],
) -> Config:
    raw: dict[str, Any] = {
        "paths.inbox": str(root / "inbox"),
        "paths.outbox": str(root / "outbox"),
        "paths.archive": str(root / "archive"),
        "paths.state": str(root / "state.db"),
        "api.base_url": base_url,
        "api.visibility_window": "1s",
        "inbox.settle_seconds": 0,
        "poll.initial_seconds": 0.5,
        "poll.max_seconds": 2.0,
        "limits.requests_per_second": 500,
        "limits.burst": 100,
        "webhook.listen": f"127.0.0.1:{port}",
        "webhook.overdue_after": 30,
    }
    for section, values in sections.items():
        for key, value in values.items():
            raw[f"{section}.{key}"] = value
    env = {"BEM_API_KEY": API_KEY, "BEM_WEBHOOK_SECRET": SECRET} | (environ or {})
    return load_config(None, environ=env, overrides=raw)


def hook_emulator(**settings: Any) -> Emulator:
    values: dict[str, Any] = {"api_key": API_KEY, "latency_min": 0.2, "latency_max": 0.5}
    return Emulator(EmulatorSettings(**(values | settings)))


async def subscribe(base_url: str, hook_url: str, *, function: str = FUNCTION) -> None:
    async with httpx.AsyncClient(base_url=base_url, headers={"x-api-key": API_KEY}) as http:
        for kind in ("transform", "error"):
            body = {"name": kind, "type": kind, "functionName": function, "webhookURL": hook_url}
            (await http.post("/v3/subscriptions", json=body)).raise_for_status()


def runner_for(config: Config, *, drain: bool, progress: Progress | None = None) -> Runner:
    options = RunnerOptions(drain=drain, handle_signals=False, supervise_every=0.05)
    return Runner(config, options, events=None, progress=progress)


async def drain_with_hooks(config: Config) -> Outcome:
    return await runner_for(config, drain=True).serve()


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Runner]:
    """A runner in ``run`` mode with its receiver listening, until the block ends.

    The receiver binds its socket when its stage starts, before the supervisor's first turn
    reports progress; the second report (the first is the startup baseline) comes after it.
    """
    reports = 0
    listening = anyio.Event()

    async def progress(_: Counts) -> None:
        nonlocal reports
        reports += 1
        if reports >= 2:
            listening.set()

    runner = runner_for(config, drain=False, progress=progress)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(runner.serve)
        with anyio.fail_after(10):
            await listening.wait()
        try:
            yield runner
        finally:
            runner.should_exit = True


def event_states(state: Path) -> dict[str, int]:
    with sqlite3.connect(state) as db:
        rows = db.execute("SELECT state, count(*) FROM webhook_events GROUP BY state").fetchall()
    return {row[0]: row[1] for row in rows}


def calls_gets(emulator: Emulator) -> int:
    requests = emulator.stats()["requests"]
    return sum(
        n for route, by_status in requests.items() if route.startswith("GET /v3/calls")
        for n in by_status.values()
    )  # fmt: skip
