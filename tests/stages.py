"""One stage at a time: a real store, a real client over ASGI to the emulator, and a fake clock.

:func:`stage_world` builds what :class:`runner.daemon.Runner` builds for its stages, without the
stages themselves; a test builds the stage it is about and calls it one pass at a time, moving
the clock (and the emulator's time, which does not follow the clock by itself) in between.
"""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from runner.api.client import BemClient
from runner.clock import FakeClock
from runner.context import Context
from runner.emulator import Emulator
from runner.ratelimit import RateLimiter
from runner.startup import limits_for
from runner.store.base import CallRow, FileRow
from runner.store.sqlite import SqliteStore, open_sqlite_store
from runner.watch import Watcher

from .fake_time import fake_clock
from .pipeline import API_KEY, make_config, write_files


@dataclass
class World:
    ctx: Context
    clock: FakeClock
    emulator: Emulator
    store: SqliteStore
    watcher: Watcher
    """The intake of this world (events off): the stage that puts files into the store."""

    def advance(self, seconds: float) -> None:
        """Move the runner's clock and the emulator's time together."""
        self.clock.advance(seconds)
        self.emulator.advance(seconds)

    def drop(self, *files: tuple[str, bytes], age: float = 0.0) -> None:
        """Write inbox files as written ``age`` seconds before the clock's wall time (not the
        real one)."""
        for rel in write_files(self.ctx.config.paths.inbox, files):
            written_at = int((self.clock.wall() - age) * 1e9)
            os.utime(self.ctx.config.paths.inbox / rel, ns=(written_at, written_at))

    async def take(self, *files: tuple[str, bytes]) -> int:
        """Drop files and let intake take them (a full scan); how many it took."""
        self.drop(*files)
        return await self.watcher.take(full=True)

    async def call_of(self, rel: str) -> CallRow:
        """The call of the latest file stored under ``rel``."""
        return await self.store.call(call_row_id_of(self.ctx.config.paths.state, rel))

    async def files_of(self, call: CallRow) -> list[FileRow]:
        return (await self.store.files_of_calls([call.id]))[call.id]

    def requests(self, route: str) -> dict[str, int]:
        """Answers the emulator gave on ``route`` (e.g. "GET /v3/calls"), by status."""
        counts: dict[str, int] = self.emulator.stats()["requests"].get(route, {})
        return counts


def call_row_id_of(state: Path, rel: str) -> int:
    """Read from the database as another reader would: the store offers no lookup by name."""
    connection = sqlite3.connect(state)
    try:
        row = connection.execute(
            "SELECT call_row_id FROM files WHERE rel = ? ORDER BY id DESC LIMIT 1",
            (os.fsencode(rel),),
        ).fetchone()
    finally:
        connection.close()
    assert row is not None, f"{rel} was never stored"
    assert row[0] is not None, f"{rel} is in no call"
    return int(row[0])


@asynccontextmanager
async def stage_world(
    root: Path,
    emulator: Emulator,
    *,
    draining: bool = False,
    api_key: str = API_KEY,
    **sections: dict[str, Any],
) -> AsyncIterator[World]:
    config = make_config(root, **sections)
    config.paths.inbox.mkdir(parents=True, exist_ok=True)
    config.paths.outbox.mkdir(parents=True, exist_ok=True)
    clock = fake_clock()
    async with (
        open_sqlite_store(config.paths.state) as store,
        BemClient(
            base_url=config.api.base_url,
            api_key=api_key,
            limiter=RateLimiter(**limits_for(config), clock=clock),
            transport=httpx.ASGITransport(app=emulator.app),
            timeout=config.api.timeout_seconds,
            clock=clock,
        ) as client,
    ):
        await store.recover()
        ctx = Context(
            config=config,
            store=store,
            client=client,
            clock=clock,
            draining=draining,
            rng=random.Random(0),
        )
        yield World(ctx, clock, emulator, store, Watcher(ctx, events=None))
