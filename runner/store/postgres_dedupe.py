"""Content dedupe in the PostgreSQL store: the facts read, :func:`runner.dedupe.decide` applied.

A decision and every wake-up hold one transaction-scoped advisory lock: without it, a delivery
committed while a decision was reading could wake nobody (the waiter was not written yet), and
the waiter would wait until the next start. Calls another runner holds are not decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg.rows import dict_row

from runner.dedupe import Candidate, ContentKey, Peer, Source, content_key, decide
from runner.store.base import CallAsDelivered, CallRow, FileRow, Settled, calls_as_delivered
from runner.store.postgres_plumbing import QUERIES, Connection, PostgresPlumbing

DEDUPE_LOCK = 0x62656D03
"""The first key of the dedupe advisory lock (see :mod:`.postgres_setup`)."""


class PostgresDedupe(PostgresPlumbing):
    async def settle_duplicates(self, call_row_ids: Sequence[int], *, now: float) -> Settled:
        if not call_row_ids:
            return Settled(reused=[], waiting=[])
        async with self._transaction("settle_duplicates") as conn:
            await _lock(conn)
            rows = await _all(
                conn, "dedupe_candidates", {"call_row_ids": list(call_row_ids), "me": self._me}
            )
            candidates = [
                Candidate(r["call_row_id"], key)
                for r in rows
                if (key := content_key(r["sha256"], r["workflow"], r["input_type"])) is not None
            ]
            if not candidates:
                return Settled(reused=[], waiting=[])
            keys = sorted({c.key for c in candidates})
            arrays = {
                "shas": [k.sha256 for k in keys],
                "workflows": [k.workflow for k in keys],
                "input_types": [k.input_type for k in keys],
            }
            sources = {
                ContentKey(r["sha256"], r["workflow"], r["input_type"]): Source(
                    r["file_id"], r["call_id"]
                )
                for r in await _all(conn, "dedupe_sources", arrays)
            }
            peers: dict[ContentKey, list[Peer]] = {}
            for r in await _all(conn, "dedupe_peers", arrays):
                key = ContentKey(r["sha256"], r["workflow"], r["input_type"])
                peers.setdefault(key, []).append(
                    Peer(r["call_row_id"], r["state"], r["mode"] != "file")
                )
            decisions = decide(candidates, sources, peers)
            reused = [d for d in decisions if d.action == "reuse" and d.source is not None]
            waiting = [d.call_row_id for d in decisions if d.action == "wait"]
            async with conn.cursor() as cursor:
                if reused:
                    await cursor.executemany(
                        QUERIES["mark_reused"],
                        [
                            {"id": d.call_row_id, "source": d.source.file_id}
                            | {"call_id": d.source.call_id, "now": now}
                            for d in reused
                            if d.source is not None
                        ],
                    )
                if waiting:
                    await cursor.executemany(
                        QUERIES["mark_waiting"], [{"id": gid} for gid in waiting]
                    )
        return Settled(reused=[d.call_row_id for d in reused], waiting=waiting)

    async def reuse_sources(self, file_ids: Sequence[int]) -> dict[int, CallAsDelivered]:
        if not file_ids:
            return {}
        sources = await self._rows(FileRow, "files_by_id", {"file_ids": sorted(set(file_ids))})
        call_row_ids = sorted({f.call_row_id for f in sources if f.call_row_id is not None})
        calls = await self._rows(CallRow, "calls_by_id", {"call_row_ids": call_row_ids})
        call_files = await self._rows(FileRow, "call_files", {"call_row_ids": call_row_ids})
        return calls_as_delivered(sources, calls, call_files)

    @staticmethod
    async def _wake_duplicates(conn: Connection, file_ids: Sequence[int]) -> None:
        """Waiting calls of these files' contents go back to ready, under the dedupe lock."""
        if file_ids:
            await _lock(conn)
            await conn.execute(QUERIES["wake_duplicates"], {"file_ids": list(file_ids)})


async def _lock(conn: Connection) -> None:
    await conn.execute(QUERIES["dedupe_lock"], {"purpose": DEDUPE_LOCK})


async def _all(conn: Connection, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(QUERIES[name], params)
        return await cursor.fetchall()
