"""Several runners on one PostgreSQL store: claims, leases, heartbeats, expiry and fencing.

Time is the database's: a runner "falls silent" or a lease "passes" by moving its timestamps
back in the database, never by waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from runner.errors import ClaimLostError, StoreUnavailableError
from runner.route import Destination
from runner.store.base import CallRow, Finished, NewFile
from runner.store.postgres import PostgresStore, open_postgres_store
from runner.store.postgres_dedupe import _lock as take_dedupe_lock
from runner.store.postgres_plumbing import QUERIES, Connection
from tests.conftest import run_sql

pytestmark = pytest.mark.anyio
pytest_plugins = ["tests.postgres"]


def _files(count: int, prefix: str = "wf/") -> list[NewFile]:
    return [
        NewFile(f"{prefix}{n}", 1, 1, None, "text", Destination("wf", "file", f"{prefix}{n}", "x"))
        for n in range(count)
    ]


def falls_silent(url: str, runner_id: str) -> None:
    run_sql(
        url, f"UPDATE runners SET heartbeat_at = now() - interval '1 hour' WHERE id = '{runner_id}'"
    )


async def test_runners_claiming_at_once_share_the_work_without_overlap(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    await a.add_files(_files(40), now=1.0, batch_limits={})
    taken: dict[str, list[int]] = {"a": [], "b": []}

    async def drain(name: str, store: PostgresStore) -> None:
        while page := await store.claim_ready(now=1.0, limit=3):
            taken[name] += [g.id for g in page]
            await store.mark_sending([g.id for g in page], now=2.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, "a", a)
        tg.start_soon(drain, "b", b)
    assert not set(taken["a"]) & set(taken["b"])
    assert len(taken["a"]) + len(taken["b"]) == 40
    assert await a.open_call_count() == 40


async def test_a_held_call_is_not_handed_to_another_runner(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    await a.add_files(_files(3), now=1.0, batch_limits={})
    mine = await a.claim_ready(now=1.0, limit=2)
    theirs = await b.claim_ready(now=1.0, limit=10)
    everything = {g.id for g in await a.ready_calls(now=1.0, limit=10)}
    assert len(mine) == 2
    assert {g.id for g in theirs} == everything - {g.id for g in mine}
    # given back, it is anyone's
    await a.release([g.id for g in mine])
    assert {g.id for g in await b.claim_ready(now=1.0, limit=10)} == everything


async def test_a_write_to_a_call_another_runner_holds_is_refused_whole(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    await a.add_files(_files(2), now=1.0, batch_limits={})
    (held,) = await a.claim_ready(now=1.0, limit=1)
    (free,) = [g for g in await b.ready_calls(now=1.0, limit=10) if g.id != held.id]
    with pytest.raises(ClaimLostError, match="held by another runner"):
        await b.mark_sending([free.id, held.id], now=2.0)
    assert (await b.call(free.id)).state == "ready"  # nothing of it was written
    assert (await b.call(held.id)).state == "ready"
    for write in (
        b.mark_submit_later([held.id], not_before=5.0),
        b.mark_unknown([held.id], not_before=5.0),
        b.mark_terminal([Finished(held.id, "failed", None, "x")], now=5.0),
        b.drop_empty_call(held.id),
    ):
        with pytest.raises(ClaimLostError):
            await write
    file = (await b.files_of_calls([held.id]))[held.id][0]
    with pytest.raises(ClaimLostError):
        await b.reject_queued_file(file, "vanished")
    assert (await b.files_of_calls([held.id]))[held.id] == [file]
    await a.mark_sending([held.id], now=2.0)  # its holder may


async def test_moving_a_call_on_gives_its_claim_up(
    runners: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = runners
    await a.add_files(_files(1), now=1.0, batch_limits={})
    (call,) = await a.claim_ready(now=1.0, limit=1)
    await a.mark_sending([call.id], now=2.0)
    assert await b.claim_due_polls(now=9.0, limit=10) == []
    await a.mark_submitted(call.id, call_id="c", status=None, now=3.0, next_poll=4.0)
    # any runner polls it now, and only one at a time
    (polled,) = await b.claim_due_polls(now=4.0, limit=10)
    assert await a.claim_due_polls(now=4.0, limit=10) == []
    await b.mark_terminal([Finished(polled.id, "completed", None, None)], now=5.0)
    assert [g.id for g in await a.claim_terminal(limit=10)] == [call.id]


async def test_a_silent_runner_loses_its_claims_and_its_sends_become_unknown(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    await a.add_files(_files(2), now=1.0, batch_limits={})
    sending, waiting = await a.claim_ready(now=1.0, limit=2)
    await a.mark_sending([sending.id], now=2.0)
    assert [(r.id, r.calls_held) for r in await b.runners()] == [("a", 1), ("b", 0)]
    assert await b.expire_runners() == []  # a is alive

    falls_silent(postgres_url, "a")
    assert await b.expire_runners() == ["a"]
    lost = await b.call(sending.id)
    assert (lost.state, lost.not_before) == ("unknown", 0)
    assert [r.id for r in await b.runners()] == ["b"]
    # whoever takes it resolves it by listing; the other is free to send
    assert [g.id for g in await b.claim_due_unknown(now=3.0, limit=10)] == [sending.id]
    assert [g.id for g in await b.claim_ready(now=3.0, limit=10)] == [waiting.id]

    # the silent runner wakes up: fenced
    with pytest.raises(ClaimLostError, match="declared dead"):
        await a.heartbeat()
    with pytest.raises(ClaimLostError):
        await a.mark_submitted(sending.id, call_id="late", status=None, now=4.0, next_poll=5.0)
    assert (await b.call(sending.id)).call_id is None


async def test_a_runner_never_declares_itself_dead(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    falls_silent(postgres_url, "a")
    assert await a.expire_runners() == []
    assert await b.expire_runners() == ["a"]


async def test_a_runner_declared_dead_joins_again_with_nothing_and_stays_fenced(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    await a.add_files(_files(2), now=1.0, batch_limits={})
    sending, waiting = await a.claim_ready(now=1.0, limit=2)
    await a.mark_sending([sending.id], now=2.0)
    falls_silent(postgres_url, "a")
    assert await b.expire_runners() == ["a"]
    (taken,) = await b.claim_due_unknown(now=3.0, limit=10)
    with pytest.raises(ClaimLostError, match="declared dead"):
        await a.heartbeat()

    await a.join()
    await a.heartbeat()  # alive again
    assert [(r.id, r.calls_held) for r in await b.runners()] == [("a", 0), ("b", 1)]
    assert await b.expire_runners() == []
    # what another runner took meanwhile stays fenced off; what nobody took is free again
    with pytest.raises(ClaimLostError):
        await a.mark_submitted(taken.id, call_id="late", status=None, now=4.0, next_poll=5.0)
    assert (await b.call(taken.id)).call_id is None
    assert [g.id for g in await a.claim_ready(now=4.0, limit=10)] == [waiting.id]


async def test_a_lease_not_renewed_passes_and_a_heartbeat_renews_it(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    await a.add_files(_files(1), now=1.0, batch_limits={})
    await a.claim_ready(now=1.0, limit=1)
    run_sql(postgres_url, "UPDATE calls SET lease_until = now() - interval '1 second'")
    await a.heartbeat()
    assert await b.claim_ready(now=1.0, limit=1) == []
    run_sql(postgres_url, "UPDATE calls SET lease_until = now() - interval '1 second'")
    (taken,) = await b.claim_ready(now=1.0, limit=1)
    with pytest.raises(ClaimLostError):
        await a.mark_sending([taken.id], now=2.0)


async def test_a_starting_runner_leaves_another_ones_post_in_flight_alone(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    await a.add_files(_files(2), now=1.0, batch_limits={})
    held, unheld = await a.ready_calls(now=1.0, limit=2)
    await a.claim_ready(now=1.0, limit=1)
    await a.mark_sending([held.id, unheld.id], now=2.0)
    await b.recover()
    assert (await b.call(held.id)).state == "sending"  # a is alive and holds it
    assert (await b.call(unheld.id)).state == "unknown"  # nobody does


async def test_a_runner_that_leaves_gives_everything_up(postgres_url: str) -> None:
    async with open_postgres_store(postgres_url, runner_id="a") as a:
        await a.add_files(_files(2), now=1.0, batch_limits={})
        first, _ = await a.claim_ready(now=1.0, limit=2)
        await a.mark_sending([first.id], now=2.0)
    async with open_postgres_store(postgres_url, runner_id="b") as b:
        assert [r.id for r in await b.runners()] == ["b"]
        assert (await b.call(first.id)).state == "unknown"
        assert len(await b.claim_ready(now=1.0, limit=10)) == 1


async def test_a_post_goes_out_only_while_its_runner_still_holds_the_call(
    postgres_url: str, runners: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = runners
    await a.add_files(_files(1), now=1.0, batch_limits={})
    (call,) = await a.claim_ready(now=1.0, limit=1)
    await a.mark_sending([call.id], now=2.0)
    await a.confirm_sending([call.id], now=3.0)  # still a's: its POST may go out
    assert (await b.call(call.id)).sent_at == 3.0  # the visibility window counts from here
    # a waited for the rate limit (or froze) past its lease: b takes the call over as unknown
    falls_silent(postgres_url, "a")
    assert await b.expire_runners() == ["a"]
    with pytest.raises(ClaimLostError):
        await a.confirm_sending([call.id], now=40.0)
    (taken,) = await b.claim_due_unknown(now=41.0, limit=10)
    assert taken.id == call.id
    with pytest.raises(ClaimLostError):
        await a.confirm_sending([call.id], now=42.0)
    assert (await b.call(call.id)).sent_at == 3.0


@asynccontextmanager
async def frozen_holding(
    frozen: PostgresStore, take_lock: Callable[[Connection], Awaitable[object]]
) -> AsyncIterator[None]:
    """``frozen`` sits idle in a transaction that took a lock, as a paused VM or a SIGSTOPped
    process would, until the block ends; its session is ended by the server meanwhile."""
    locked, resumed = anyio.Event(), anyio.Event()

    async def hold_the_lock_frozen() -> None:
        async with frozen._transaction("freeze") as conn:
            await take_lock(conn)
            locked.set()
            await resumed.wait()
            await conn.execute("SELECT 1")  # the server ended it meanwhile

    async def freeze_holding_the_lock() -> None:
        with pytest.raises(StoreUnavailableError, match="idle-in-transaction timeout"):
            await hold_the_lock_frozen()

    async with anyio.create_task_group() as tg:
        tg.start_soon(freeze_holding_the_lock)
        try:
            await locked.wait()
            yield
        finally:
            resumed.set()  # whatever happened, the frozen one thaws (its wait is shielded)


@asynccontextmanager
async def frozen_and_live(
    postgres_url: str,
) -> AsyncIterator[tuple[PostgresStore, PostgresStore, CallRow]]:
    """A runner about to freeze (a 1 s lease), a live one, and a call the live one claimed."""
    async with (
        open_postgres_store(postgres_url, runner_id="frozen", lease_seconds=1.0) as frozen,
        open_postgres_store(postgres_url, runner_id="live") as live,
    ):
        await live.add_files(_files(1), now=1.0, batch_limits={})
        (call,) = await live.claim_ready(now=1.0, limit=1)
        yield frozen, live, call


async def test_a_runner_frozen_inside_a_transaction_holds_its_locks_no_longer_than_its_lease(
    postgres_url: str,
) -> None:
    # the content-dedupe lock, which every delivery and every dedupe decision of the others
    # waits on
    async with frozen_and_live(postgres_url) as (frozen, live, call):
        async with frozen_holding(frozen, take_dedupe_lock):
            with anyio.fail_after(30):  # the server's clock: about the frozen one's lease
                settled = await live.settle_duplicates([call.id], now=2.0)
        assert settled.reused == []
        assert settled.waiting == []
        # thawed, it goes on with a fresh session
        assert [c.id for c in await frozen.ready_calls(now=3.0, limit=10)] == [call.id]


async def test_a_runner_frozen_holding_a_calls_row_holds_it_no_longer_than_its_lease(
    postgres_url: str,
) -> None:
    # a row lock: every write to that call (here the live runner's mark_sending) waits on it
    async with frozen_and_live(postgres_url) as (frozen, live, call):

        async def lock_the_row(conn: Connection) -> None:
            await conn.execute(QUERIES["lock_call"], {"call_row_id": call.id})

        async with frozen_holding(frozen, lock_the_row):
            with anyio.fail_after(30):
                await live.mark_sending([call.id], now=2.0)
        assert (await frozen.call(call.id)).state == "sending"
