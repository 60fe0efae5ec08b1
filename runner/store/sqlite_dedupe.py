"""Content dedupe in the SQLite store: the facts read, :func:`runner.dedupe.decide` applied.

The reads and the writes are one ``BEGIN IMMEDIATE`` transaction, and the store has one
writer, so no delivery can slip between what was read and what was decided.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite

from runner.dedupe import Candidate, ContentKey, Peer, Source, content_key, decide
from runner.store.base import CallAsDelivered, CallRow, FileRow, Settled, calls_as_delivered
from runner.store.sqlite_plumbing import QUERIES, SqlitePlumbing


class SqliteDedupe(SqlitePlumbing):
    async def settle_duplicates(self, call_row_ids: Sequence[int], *, now: float) -> Settled:
        if not call_row_ids:
            return Settled(reused=[], waiting=[])
        async with self._transaction("settle_duplicates") as db:
            candidates = await _candidates(db, call_row_ids)
            if not candidates:
                return Settled(reused=[], waiting=[])
            keys = json.dumps(sorted({_key_list(c.key) for c in candidates}))
            sources = {
                ContentKey(r["sha256"], r["workflow"], r["input_type"]): Source(
                    r["file_id"], r["call_id"]
                )
                for r in await _all(db, "dedupe_sources", {"keys": keys})
            }
            peers: dict[ContentKey, list[Peer]] = {}
            for r in await _all(db, "dedupe_peers", {"keys": keys}):
                key = ContentKey(r["sha256"], r["workflow"], r["input_type"])
                peers.setdefault(key, []).append(
                    Peer(r["call_row_id"], r["state"], r["mode"] != "file")
                )
            decisions = decide(candidates, sources, peers)
            reused = [d for d in decisions if d.action == "reuse"]
            waiting = [d.call_row_id for d in decisions if d.action == "wait"]
            await db.executemany(
                QUERIES["mark_reused"],
                [
                    {"id": d.call_row_id, "source": d.source.file_id, "call_id": d.source.call_id}
                    | {"now": now}
                    for d in reused
                    if d.source is not None
                ],
            )
            await db.executemany(QUERIES["mark_waiting"], [{"id": gid} for gid in waiting])
        return Settled(reused=[d.call_row_id for d in reused], waiting=waiting)

    async def reuse_sources(self, file_ids: Sequence[int]) -> dict[int, CallAsDelivered]:
        if not file_ids:
            return {}
        wanted = json.dumps(sorted(set(file_ids)))
        # small reads: the files, calls and call files of one batch of deliveries
        sources = await self._rows(FileRow, "files_by_id", {"file_ids": wanted})
        call_row_ids = json.dumps(
            sorted({f.call_row_id for f in sources if f.call_row_id is not None})
        )
        calls = await self._rows(CallRow, "calls_by_id", {"call_row_ids": call_row_ids})
        call_files = await self._rows(FileRow, "call_files", {"call_row_ids": call_row_ids})
        return calls_as_delivered(sources, calls, call_files)


def wake_duplicates(db: sqlite3.Connection, file_ids: Sequence[int]) -> None:
    """Waiting calls of these files' contents go back to ready (one statement)."""
    if file_ids:
        db.execute(QUERIES["wake_duplicates"], {"file_ids": json.dumps(list(file_ids))})


async def _candidates(db: aiosqlite.Connection, call_row_ids: Sequence[int]) -> list[Candidate]:
    rows = await _all(db, "dedupe_candidates", {"call_row_ids": json.dumps(list(call_row_ids))})
    candidates = []
    for r in rows:
        key = content_key(r["sha256"], r["workflow"], r["input_type"])
        if key is not None:
            candidates.append(Candidate(r["call_row_id"], key))
    return candidates


async def _all(db: aiosqlite.Connection, name: str, params: dict[str, Any]) -> list[Any]:
    async with db.execute(QUERIES[name], params) as cursor:
        return list(await cursor.fetchall())


def _key_list(key: ContentKey) -> tuple[str, str, str]:
    return (key.sha256, key.workflow, key.input_type)
