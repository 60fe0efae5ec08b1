"""The several-runner part of the Store protocol for a store one process owns (SQLite).

Its owner holds every claim, so a claim is the list it replaces, nothing is ever fenced, and the
only runner is this process.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import anyio

from runner.store.base import CallRow, RunnerRow, Tokens, this_runner_id


class _Lists(Protocol):
    async def ready_calls(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def due_unknown(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def due_polls(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def terminal_calls(self, *, limit: int) -> list[CallRow]: ...
    async def open_call_count(self) -> int: ...

    @property
    def owned(self) -> bool: ...


_STARTED_AT = time.time()


class SingleOwner:
    async def claim_ready(self: _Lists, *, now: float, limit: int) -> list[CallRow]:
        return await self.ready_calls(now=now, limit=limit)

    async def claim_due_unknown(self: _Lists, *, now: float, limit: int) -> list[CallRow]:
        return await self.due_unknown(now=now, limit=limit)

    async def claim_due_polls(self: _Lists, *, now: float, limit: int) -> list[CallRow]:
        return await self.due_polls(now=now, limit=limit)

    async def claim_terminal(self: _Lists, *, limit: int) -> list[CallRow]:
        return await self.terminal_calls(limit=limit)

    async def release(self, call_row_ids: Sequence[int]) -> None:
        return None

    async def confirm_sending(self, call_row_ids: Sequence[int], *, now: float) -> None:
        return None

    async def join(self) -> None:
        return None

    async def heartbeat(self) -> None:
        return None

    async def expire_runners(self) -> list[str]:
        return []

    async def runners(self: _Lists) -> list[RunnerRow]:
        """This process, when it owns the store; none when it only reads it (``status``)."""
        if not self.owned:
            return []
        host, pid = socket.gethostname(), os.getpid()
        calls = await self.open_call_count()
        return [RunnerRow(this_runner_id(), host, pid, _STARTED_AT, time.time(), calls)]

    async def take_tokens(self, want: int, *, rate: float, burst: float) -> Tokens:
        return Tokens(want, 0.0)

    async def pause_sending(self, seconds: float) -> None:
        return None

    @asynccontextmanager
    async def wake_ups(self) -> AsyncIterator[AsyncIterator[str]]:
        yield _never()


async def _never() -> AsyncIterator[str]:
    await anyio.sleep_forever()
    yield ""  # never reached: makes this an async generator
