"""The PostgreSQL store: psycopg 3 (async) over a small connection pool, under anyio's asyncio.

Every statement lives in ``postgres_queries.sql``; these classes only run them, with the same
meaning as the SQLite store (the store contract suite runs on both). File names are BYTEA.

- where to connect, and the password: :mod:`.postgres_target`
- the schema, its migration and its owner: :mod:`.postgres_setup`
- statements, transactions and fencing: :mod:`.postgres_plumbing`
- taking files into calls: :mod:`.postgres_intake`
- claims and runners: :mod:`.postgres_claims`
- the shared rate budget: :mod:`.postgres_budget`
- wake-ups between runners: :mod:`.postgres_wake`
- content dedupe: :mod:`.postgres_dedupe`
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from runner.errors import ClaimLostError, StoreError, StoreUnavailableError
from runner.names import from_raw
from runner.store.base import (
    DEFAULT_LEASE_SECONDS,
    CallRow,
    Counts,
    Delivery,
    FileRow,
    Finished,
    KnownFile,
    NextPoll,
    next_poll_params,
    terminal_params,
)
from runner.store.postgres_budget import PostgresBudget
from runner.store.postgres_claims import PostgresClaims
from runner.store.postgres_dedupe import PostgresDedupe
from runner.store.postgres_intake import PostgresIntake
from runner.store.postgres_plumbing import QUERIES, _clean
from runner.store.postgres_setup import (
    OWNER_LOCK,
    SCHEMA_VERSION,
    check_readable,
    connect,
    disown,
    migrate,
    own,
)
from runner.store.postgres_target import (
    CONNECT_TIMEOUT_SECONDS,
    Target,
    connect_kwargs,
    shown_url,
)
from runner.store.postgres_wake import PostgresWake
from runner.store.postgres_webhooks import PostgresWebhooks

__all__ = [
    "OWNER_LOCK",
    "POOL_SIZE",
    "SCHEMA_VERSION",
    "PostgresStore",
    "Target",
    "open_postgres_store",
    "shown_url",
]

log = structlog.get_logger("runner.store.postgres")

POOL_SIZE = 4
POOL_WAIT_SECONDS = 5.0
"""How long a statement waits for a connection: a server that is gone is an error this soon."""
MIN_IDLE_IN_TRANSACTION_MS = 1000
"""The least the server lets a transaction of ours sit idle, however short the lease."""


# -- opening ------------------------------------------------------------------------------------


def _ends_frozen_transactions(
    lease_seconds: float,
) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    """Each pooled session's transactions end if left idle longer than the lease.

    A runner frozen inside a transaction (a paused VM, SIGSTOP, a network partition with no
    reset) would otherwise hold its row and advisory locks for ever, and every other runner would
    wait on them; this way the server rolls it back once the runner has lost its claims anyway.
    """
    timeout_ms = max(MIN_IDLE_IN_TRANSACTION_MS, round(lease_seconds * 1000))

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(QUERIES["end_frozen_transactions"], {"timeout": f"{timeout_ms}ms"})

    return configure


@asynccontextmanager
async def open_postgres_store(
    url: str,
    *,
    read_only: bool = False,
    runner_id: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[PostgresStore]:
    """Open the store at ``url``, migrating it first unless ``read_only``.

    A writer without a ``runner_id`` owns the store while it is open, and a second one is refused
    with :class:`StateInUseError`. With one, it shares the store: it joins the runners (its
    claims last ``lease_seconds`` unless renewed by :meth:`PostgresStore.heartbeat`) and leaves
    when closed.
    """
    target = Target.from_url(url, os.environ if environ is None else environ)
    kwargs = connect_kwargs(target)
    owner = await connect(target, kwargs)
    owns = False
    try:
        if read_only:
            await check_readable(owner, target)
        else:
            await migrate(owner, target)
            if runner_id is None:
                await own(owner, target)
                owns = True
        pool = AsyncConnectionPool(
            target.conninfo,
            kwargs=kwargs,
            min_size=1,
            max_size=POOL_SIZE,
            timeout=POOL_WAIT_SECONDS,
            configure=_ends_frozen_transactions(lease_seconds),
            open=False,
            name="bem-runner-store",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            raise StoreError(f"{target.shown}: cannot connect: {target.scrub(str(exc))}") from None
        store = PostgresStore(pool, target, runner_id=runner_id, lease_seconds=lease_seconds)
        store.owned = owns
        try:
            if runner_id is not None and not read_only:
                await store.join()
            yield store
            if runner_id is not None and not read_only:
                with anyio.CancelScope(shield=True):
                    try:
                        await store.leave()
                    except StoreUnavailableError as exc:
                        # its lease runs out instead: the others take its work over then
                        log.warning("cannot leave the store's runners", error=exc.message)
        finally:
            with anyio.CancelScope(shield=True):
                await pool.close()
    finally:
        with anyio.CancelScope(shield=True):
            if owns:
                await disown(owner)
            await owner.close()


# -- the store ----------------------------------------------------------------------------------


class PostgresStore(
    PostgresClaims, PostgresIntake, PostgresBudget, PostgresWake, PostgresWebhooks, PostgresDedupe
):
    async def integrity_check(self) -> str:
        mismatched = int(await self._scalar("integrity_check") or 0)
        if mismatched:
            return f"{mismatched} calls whose file count does not match their files"
        return "ok"

    async def close(self) -> None:
        await self._pool.close()

    # -- intake -----------------------------------------------------------------------------

    async def recover(self) -> None:
        """A POST that was in flight when the last process died has an unknown outcome; a
        call waiting for a duplicate's result looks again (a wake-up may have been lost)."""
        async with self._transaction("recover_sending") as conn:
            await conn.execute(QUERIES["recover_sending"], {"me": self._me})
            await conn.execute(QUERIES["wake_all_waiting"])

    async def known_files(self) -> dict[str, KnownFile]:
        rows = await self._fetch("known_files")
        return {
            from_raw(row["rel"]): KnownFile(row["size"], row["mtime_ns"], row["state"])
            for row in rows
        }

    async def collecting_calls(self) -> list[CallRow]:
        return await self._rows(CallRow, "collecting_calls", {})

    async def close_batch(self, call_row_id: int) -> None:
        await self._write("close_batch", [{"id": call_row_id}])

    # -- submit -----------------------------------------------------------------------------

    async def call(self, call_row_id: int) -> CallRow:
        rows = await self._rows(CallRow, "call_by_id", {"id": call_row_id})
        if not rows:
            raise StoreError(f"{self._target.shown}: no call {call_row_id}")
        return rows[0]

    async def files_of_calls(self, call_row_ids: Sequence[int]) -> dict[int, list[FileRow]]:
        """The files of many calls with one query, by call."""
        by_call: dict[int, list[FileRow]] = {gid: [] for gid in call_row_ids}
        if not call_row_ids:
            return by_call
        rows = await self._rows(FileRow, "files_of_calls", {"call_row_ids": list(call_row_ids)})
        for row in rows:
            assert row.call_row_id is not None
            by_call[row.call_row_id].append(row)
        return by_call

    async def supersede_file(self, file: FileRow) -> None:
        """The file changed after it was queued: drop it from its call; it will be taken anew."""
        async with self._transaction("supersede_file") as conn, conn.cursor() as cursor:
            if file.call_row_id is not None:
                await self._many(
                    cursor, "shrink_call", [{"id": file.call_row_id, "size": file.size}]
                )
            await cursor.execute(QUERIES["supersede_file"], {"id": file.id})
            await self._wake_duplicates(conn, [file.id])

    async def reject_queued_file(self, file: FileRow, reason: str) -> None:
        async with self._transaction("reject_file") as conn, conn.cursor() as cursor:
            if file.call_row_id is not None:
                await self._many(
                    cursor, "shrink_call", [{"id": file.call_row_id, "size": file.size}]
                )
            await cursor.execute(QUERIES["reject_file"], _clean({"id": file.id, "reason": reason}))

    async def drop_empty_call(self, call_row_id: int) -> None:
        await self._write("drop_empty_call", [{"id": call_row_id}])

    async def mark_sending(self, call_row_ids: list[int], *, now: float) -> None:
        await self._write("mark_sending", ({"id": gid, "now": now} for gid in call_row_ids))

    async def confirm_sending(self, call_row_ids: Sequence[int], *, now: float) -> None:
        ids = sorted(set(call_row_ids))
        if not ids:
            return
        changed = await self._statement("confirm_sending", {"ids": ids, "now": now})
        if changed < len(ids):
            raise ClaimLostError(
                f"{self._target.shown}: confirm_sending: {len(ids) - changed} of {len(ids)} "
                "calls are held by another runner (or gone); nothing is sent"
            )

    async def mark_submitted(
        self, call_row_id: int, *, call_id: str, status: str | None, now: float, next_poll: float
    ) -> None:
        await self._write(
            "mark_submitted",
            [
                {
                    "id": call_row_id,
                    "call_id": call_id,
                    "status": status,
                    "now": now,
                    "next_poll": next_poll,
                }
            ],
        )

    async def mark_submit_later(self, call_row_ids: list[int], *, not_before: float) -> None:
        await self._write(
            "mark_submit_later", ({"id": gid, "not_before": not_before} for gid in call_row_ids)
        )

    async def mark_unknown(self, call_row_ids: list[int], *, not_before: float) -> None:
        await self._write(
            "mark_unknown", ({"id": gid, "not_before": not_before} for gid in call_row_ids)
        )

    async def mark_terminal(self, finished: Sequence[Finished], *, now: float) -> None:
        await self.record_polls(finished, [], now=now)

    async def record_polls(
        self, finished: Sequence[Finished], next_polls: Sequence[NextPoll], *, now: float
    ) -> None:
        """Calls that ended and the next poll of the others, in one transaction."""
        if not finished:
            await self.reschedule_polls(next_polls)
            return
        async with self._transaction("mark_terminal") as conn, conn.cursor() as cursor:
            await self._many(cursor, "mark_terminal", terminal_params(finished, now))
            if next_polls:
                await self._many(cursor, "reschedule_poll", next_poll_params(next_polls))

    # -- poll -------------------------------------------------------------------------------

    async def reschedule_polls(self, next_polls: Sequence[NextPoll]) -> None:
        await self._write("reschedule_poll", next_poll_params(next_polls))

    async def next_poll_due(self) -> float | None:
        value = await self._scalar("next_poll_due")
        return float(value) if value is not None else None

    async def next_submit_due(self) -> float | None:
        """When the next ready or unknown call is due (an unknown one is listed, not sent)."""
        value = await self._scalar("next_submit_due")
        return float(value) if value is not None else None

    # -- deliver ----------------------------------------------------------------------------

    async def rejected_files(self, *, limit: int) -> list[FileRow]:
        return await self._rows(FileRow, "rejected_files", {"limit": limit})

    async def delivered_files(self, *, limit: int) -> list[FileRow]:
        return await self._rows(FileRow, "delivered_files", {"limit": limit})

    async def mark_delivered(
        self, deliveries: Sequence[Delivery], *, finished_calls: Sequence[int], now: float
    ) -> None:
        """Files whose documents are written; calls with no file left to deliver are done."""
        if not deliveries and not finished_calls:
            return
        async with self._transaction("mark_delivered") as conn, conn.cursor() as cursor:
            if deliveries:
                await self._many(
                    cursor,
                    "mark_delivered",
                    [
                        {"id": d.file_id, "outcome": d.outcome, "reason": d.reason, "now": now}
                        for d in deliveries
                    ],
                )
            if finished_calls:
                await self._many(cursor, "mark_call_done", [{"id": g} for g in finished_calls])
            await self._wake_duplicates(conn, [d.file_id for d in deliveries])

    async def mark_done(self, file_ids: Sequence[int], *, now: float) -> None:
        await self._write("mark_done", ({"id": fid, "now": now} for fid in file_ids))

    # -- reports ----------------------------------------------------------------------------

    async def counts(self) -> Counts:
        files: dict[str, int] = {}
        for row in await self._fetch("count_files"):
            state, outcome, count = row["state"], row["outcome"], int(row["count"])
            key = f"{state}:{outcome}" if state in ("delivered", "done") and outcome else state
            files[key] = files.get(key, 0) + count
        calls = {row["state"]: int(row["count"]) for row in await self._fetch("count_calls")}
        return Counts(
            files=files,
            calls=calls,
            open_calls=await self.open_call_count(),
            reused=int(await self._scalar("count_reused") or 0),
        )

    async def unfinished_work(self) -> int:
        return int(await self._scalar("unfinished_work") or 0)

    async def recent_errors(self, *, limit: int) -> list[tuple[str, str | None, float | None]]:
        return [
            (from_raw(r["rel"]), r["reason"], r["done_at"])
            for r in await self._fetch("recent_errors", {"limit": limit})
        ]

    async def failed_files(self) -> list[FileRow]:
        return await self._rows(FileRow, "failed_files", {})

    async def mark_retried(self, file_ids: list[int]) -> None:
        await self._write("supersede_file", ({"id": fid} for fid in file_ids))
