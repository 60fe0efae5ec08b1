"""Wake-ups between runners of a PostgreSQL store: LISTEN on a connection of its own.

Writes that give other runners work ``NOTIFY`` on commit (see ``WAKES`` in
:mod:`.postgres_plumbing`), with the writer's id, so a runner is never woken by itself. A lost
connection ends the iteration with a :class:`StoreError`; nothing is lost meanwhile, since every
stage also looks on its own interval.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import psycopg
from psycopg import sql

from runner.store.postgres_plumbing import QUERIES, Connection, PostgresPlumbing
from runner.store.postgres_target import connect_kwargs
from runner.store.single_owner import SingleOwner


class PostgresWake(PostgresPlumbing):
    @asynccontextmanager
    async def wake_ups(self) -> AsyncIterator[AsyncIterator[str]]:
        if self._me is None:  # one owner: nobody else to hear from
            async with SingleOwner().wake_ups() as never:
                yield never
            return
        try:
            with anyio.CancelScope(shield=True):
                conn = await psycopg.AsyncConnection.connect(
                    self._target.conninfo, **connect_kwargs(self._target)
                )
        except psycopg.Error as exc:
            raise self._error("listen", exc) from None
        try:
            try:
                cursor = await conn.execute(QUERIES["wake_channel"])
                row = await cursor.fetchone()
                assert row is not None
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(str(row[0]))))
            except psycopg.Error as exc:
                raise self._error("listen", exc) from None
            yield self._stages(conn)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()

    async def _stages(self, conn: Connection) -> AsyncIterator[str]:
        try:
            async for notify in conn.notifies():
                stage, _, sender = notify.payload.partition(" ")
                if sender != self._me:
                    yield stage
        except psycopg.Error as exc:
            raise self._error("listen", exc) from None
