"""Several runners on one PostgreSQL store: claims, leases, heartbeats and expiry.

A claim (``claimed_by``, ``lease_until``) gives one runner a call for one stage; it is taken
with ``FOR UPDATE SKIP LOCKED``, so runners claiming at once never wait on nor share a row, and
timed by the database's clock. Every write that moves a call on gives its claim up, and every
write checks the writer still holds it (:data:`~runner.store.postgres_plumbing.FENCED`). A
runner silent past its lease is expired by the others: its claims are freed and its ``sending``
calls become ``unknown``, to be resolved by listing by whoever claims them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from psycopg.rows import dict_row

from runner.errors import ClaimLostError
from runner.store.base import CallRow, RunnerRow, rows_as, this_runner_id
from runner.store.postgres_plumbing import ALL_STAGES, QUERIES, PostgresPlumbing


class PostgresClaims(PostgresPlumbing):
    # the lists the claims replace, for a store that one process owns
    async def ready_calls(self, *, now: float, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "ready_calls", {"now": now, "limit": limit})

    async def due_unknown(self, *, now: float, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "due_unknown", {"now": now, "limit": limit})

    async def due_polls(self, *, now: float, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "due_polls", {"now": now, "limit": limit})

    async def terminal_calls(self, *, limit: int) -> list[CallRow]:
        return await self._rows(CallRow, "terminal_calls", {"limit": limit})

    async def open_call_count(self) -> int:
        return int(await self._scalar("open_call_count") or 0)

    # -- several runners --------------------------------------------------------------------
    # Without a runner id this store owns its database, so a claim is the list it replaces.

    async def claim_ready(self, *, now: float, limit: int) -> list[CallRow]:
        if self._me is None:
            return await self.ready_calls(now=now, limit=limit)
        rows = await self._claim("claim_ready", {"now": now, "limit": limit})
        return sorted(rows, key=lambda g: (g.not_before, g.id))

    async def claim_due_unknown(self, *, now: float, limit: int) -> list[CallRow]:
        if self._me is None:
            return await self.due_unknown(now=now, limit=limit)
        rows = await self._claim("claim_due_unknown", {"now": now, "limit": limit})
        return sorted(rows, key=lambda g: g.id)

    async def claim_due_polls(self, *, now: float, limit: int) -> list[CallRow]:
        if self._me is None:
            return await self.due_polls(now=now, limit=limit)
        rows = await self._claim("claim_due_polls", {"now": now, "limit": limit})
        return sorted(rows, key=lambda g: (g.not_before, g.id))

    async def claim_terminal(self, *, limit: int) -> list[CallRow]:
        if self._me is None:
            return await self.terminal_calls(limit=limit)
        rows = await self._claim("claim_terminal", {"limit": limit})
        return sorted(rows, key=lambda g: (g.finished_at or 0.0, g.id))

    async def _claim(self, name: str, params: Mapping[str, Any]) -> list[CallRow]:
        async with self._transaction(name) as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(QUERIES[name], {**params, "me": self._me, "lease": self._lease})
            rows = await cursor.fetchall()
        return rows_as(CallRow, rows)

    async def release(self, call_row_ids: Sequence[int]) -> None:
        if self._me is None or not call_row_ids:
            return
        async with self._transaction("release") as conn:
            await conn.execute(QUERIES["release"], {"ids": list(call_row_ids), "me": self._me})

    async def join(self) -> None:
        if self._me is None:
            return
        params = {"me": self._me, "host": socket.gethostname(), "pid": os.getpid()}
        async with self._transaction("join_runner") as conn:
            await conn.execute(QUERIES["join_runner"], {**params, "lease": self._lease})

    async def leave(self) -> None:
        """Gone for good: claims free, a POST still marked in flight unknown."""
        async with self._transaction("leave_runner") as conn:
            await conn.execute(QUERIES["leave_runner"], {"me": self._me})

    async def heartbeat(self) -> None:
        if self._me is None:
            return
        params = {"me": self._me, "lease": self._lease}
        async with self._transaction("heartbeat") as conn:
            cursor = await conn.execute(QUERIES["heartbeat"], params)
            if await cursor.fetchone() is None:
                raise ClaimLostError(
                    f"{self._target.shown}: runner {self._me} was declared dead by another "
                    "runner (silent past its lease); its claims were taken"
                )
            await conn.execute(QUERIES["renew_claims"], params)

    async def expire_runners(self) -> list[str]:
        async with self._transaction("expire_runners") as conn:
            cursor = await conn.execute(QUERIES["expire_runners"], {"me": self._me})
            dead = [str(row[0]) for row in await cursor.fetchall()]
            if dead and self._me is not None:
                await self._wake(conn, ALL_STAGES)
        return dead

    async def runners(self) -> list[RunnerRow]:
        """The runners that joined; a store's single owner is its only runner."""
        if self._me is None and self.owned:
            host, pid = socket.gethostname(), os.getpid()
            calls = await self.open_call_count()
            return [RunnerRow(this_runner_id(), host, pid, self._opened_at, time.time(), calls)]
        return [
            RunnerRow(
                str(r["id"]),
                str(r["host"]),
                int(r["pid"]),
                float(r["started_at"]),
                float(r["heartbeat_at"]),
                int(r["calls_held"]),
            )
            for r in await self._fetch("runners")
        ]
