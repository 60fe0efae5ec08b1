"""Taking files into a PostgreSQL store: each file's call found, opened, filled or closed.

A file-mode file's call is born ready, all of them in one pipelined statement; a folder's or
window's collecting call is locked (``FOR UPDATE``) and filled in memory, a full window closed and
another opened, and the sizes written once per call.

Runners sharing the store all scan one inbox, so each may hand over a file another one took:
their intakes run one at a time (an advisory lock), and a file whose path another runner is
working on, or the very same file (path, size, mtime, content) it finished, is left out.
"""

from __future__ import annotations

import msgspec

from runner.names import raw
from runner.store.base import BatchLimits, NewFile, new_call_params, new_file_params
from runner.store.postgres_plumbing import QUERIES, Connection, PostgresPlumbing, _clean

INTAKE_LOCK = 0x62656D04


class _CollectingCall(msgspec.Struct):
    id: int
    file_count: int
    byte_count: int


def window_is_full(call: _CollectingCall, size: int, limits: tuple[int, int]) -> bool:
    """Whether a file of ``size`` bytes would overflow the call (a lone file always fits)."""
    max_files, max_bytes = limits
    if call.file_count >= max_files:
        return True
    return call.file_count > 0 and call.byte_count + size > max_bytes


class PostgresIntake(PostgresPlumbing):
    async def add_files(
        self, files: list[NewFile], *, now: float, batch_limits: BatchLimits
    ) -> None:
        if not files:
            return
        async with self._transaction("add_files") as conn:
            if self._me is not None:
                files = await _not_taken(conn, files)
                if not files:
                    return
            call_row_ids = await self._calls_for(conn, files, now, batch_limits)
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    QUERIES["insert_file"],
                    [
                        _clean(new_file_params(new, gid, now))
                        for new, gid in zip(files, call_row_ids, strict=True)
                    ],
                )

    async def _calls_for(
        self, conn: Connection, files: list[NewFile], now: float, batch_limits: BatchLimits
    ) -> list[int | None]:
        """The call of each file (None for a rejected one), creating and closing calls."""
        call_row_ids: list[int | None] = [None] * len(files)
        alone: list[int] = []
        batched: dict[str, list[int]] = {}
        for index, new in enumerate(files):
            if new.destination is None or new.reason is not None:
                continue
            if new.destination.mode == "file":
                alone.append(index)
            else:
                batched.setdefault(new.destination.batch_key, []).append(index)
        born = await self._born_ready(conn, files, alone, now)
        for index, call_row_id in zip(alone, born, strict=True):
            call_row_ids[index] = call_row_id
        for key, indexes in batched.items():
            members = [files[i] for i in indexes]
            filled = await self._fill_open(conn, key, members, now, batch_limits.get(key))
            for index, call_row_id in zip(indexes, filled, strict=True):
                call_row_ids[index] = call_row_id
        return call_row_ids

    async def _born_ready(
        self, conn: Connection, files: list[NewFile], indexes: list[int], now: float
    ) -> list[int]:
        """A ready call of its own for each file-mode file, in one pipelined statement."""
        if not indexes:
            return []
        params = []
        for index in indexes:
            new = files[index]
            assert new.destination is not None
            params.append(new_call_params(new.destination.workflow, "file", new.rel, "ready", now))
            params[-1].update(file_count=1, byte_count=new.size)
        ids: list[int] = []
        async with conn.cursor() as cursor:
            await cursor.executemany(QUERIES["insert_call"], params, returning=True)
            while True:
                row = await cursor.fetchone()
                assert row is not None
                ids.append(int(row[0]))
                if not cursor.nextset():
                    break
        return ids

    async def _fill_open(
        self,
        conn: Connection,
        key: str,
        files: list[NewFile],
        now: float,
        limits: tuple[int, int] | None,
    ) -> list[int]:
        """Add files to the batch of ``key``; a full window is closed and another opened."""
        cursor = await conn.execute(QUERIES["collecting_call_by_key"], {"batch_key": raw(key)})
        row = await cursor.fetchone()
        current = _CollectingCall(*row) if row is not None else None
        touched: dict[int, _CollectingCall] = {}
        ids: list[int] = []
        for new in files:
            assert new.destination is not None
            if (
                current is not None
                and limits is not None
                and window_is_full(current, new.size, limits)
            ):
                await conn.execute(QUERIES["close_batch"], {"id": current.id})
                current = None
            if current is None:
                params = new_call_params(
                    new.destination.workflow, new.destination.mode, key, "collecting", now
                )
                params.update(file_count=0, byte_count=0)
                cursor = await conn.execute(QUERIES["insert_call"], params)
                inserted = await cursor.fetchone()
                assert inserted is not None
                current = _CollectingCall(int(inserted[0]), 0, 0)
            current.file_count += 1
            current.byte_count += new.size
            touched[current.id] = current
            ids.append(current.id)
        async with conn.cursor() as update:
            await update.executemany(
                QUERIES["set_batch_size"],
                [
                    {"id": g.id, "file_count": g.file_count, "byte_count": g.byte_count, "now": now}
                    for g in touched.values()
                ],
            )
        return ids


async def _not_taken(conn: Connection, files: list[NewFile]) -> list[NewFile]:
    """The files no other runner sharing the store took; waits for any intake under way."""
    await conn.execute(QUERIES["intake_lock"], {"purpose": INTAKE_LOCK})
    cursor = await conn.execute(
        QUERIES["files_taken"],
        {
            "rels": [raw(f.rel) for f in files],
            "sizes": [f.size for f in files],
            "mtimes": [f.mtime_ns for f in files],
            "shas": [f.sha256 for f in files],
        },
    )
    taken = {bytes(row[0]) for row in await cursor.fetchall()}
    return [f for f in files if raw(f.rel) not in taken]
