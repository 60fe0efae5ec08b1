"""What a runner does beside its stages when it shares its store, and how it rides out a store
that cannot be reached.

Two named side tasks run while a runner shares a PostgreSQL store with others:

- the heartbeat renews this runner's lease and its claims every ``lease_seconds / 3`` and
  expires runners silent past theirs (their ``sending`` calls become ``unknown``, resolved by
  listing by whoever claims them — never resent blindly);
- the wake-up listener turns other runners' notifications into this runner's nudges. The
  stages still look on their own intervals, so a lost notification only delays.

A runner declared dead by the others (it was silent past its lease, e.g. the store could not be
reached for that long) joins again under the same id and goes on: the others freed its claims
and their fencing keeps every write of the work it held off (:class:`ClaimLostError`, dropped by
:mod:`runner.claims`), so what it held is dropped and claimed afresh by whoever comes first. A
runner whose side task fails stops.

Temporaries in the outbox and the archive carry their runner's token (:mod:`runner.outbox`):
those of a runner no longer among the store's runners (it died before its rename) are removed
when this runner starts and whenever it expires others.

A stage that meets a store it cannot reach (:class:`StoreUnavailableError`) is started again
once it answers; a POST whose answer could not be recorded meanwhile is ``unknown`` by then
(:meth:`Store.recover`) and resolved by listing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import anyio
import structlog

from runner import names
from runner.context import Context, Nudge
from runner.errors import ClaimLostError, StoreUnavailableError
from runner.file_ops import remove_dead_temporaries
from runner.outbox import runner_token

log = structlog.get_logger("runner.sharing")

STORE_RETRY_SECONDS = 1.0
"""While the store cannot be reached, each task tries again this often."""
HEARTBEATS_PER_LEASE = 3

Stage = Callable[[], Awaitable[None]]


async def keep_running(ctx: Context, stage: Stage, *, after_outage: Stage | None = None) -> None:
    """Run ``stage`` until it returns; started again (after ``after_outage``) whenever it stops
    on a store that cannot be reached, until the runner stops."""
    while True:
        try:
            await stage()
            return
        except* StoreUnavailableError as group:
            ctx.store_health.failed(_first_message(group), now=ctx.clock.wall())
        while True:
            await ctx.clock.wait(ctx.stopping, STORE_RETRY_SECONDS)
            if ctx.stopping.is_set():
                return
            try:
                if after_outage is not None:
                    await after_outage()
                break
            except StoreUnavailableError as exc:
                ctx.store_health.failed(exc.message, now=ctx.clock.wall())


async def beat_heart(ctx: Context, *, lease_seconds: float) -> None:
    """Renew this runner's lease and claims; expire the runners that fell silent."""
    every = lease_seconds / HEARTBEATS_PER_LEASE
    swept = False
    while not ctx.stopping.is_set():
        try:
            await _renew_or_rejoin(ctx)
            dead = await ctx.store.expire_runners()
            if dead or not swept:
                await remove_leftover_temporaries(ctx)
                swept = True
        except StoreUnavailableError as exc:
            ctx.store_health.failed(exc.message, now=ctx.clock.wall())
        else:
            ctx.store_health.reached()
            if dead:
                log.warning(
                    "runners silent past their lease; their work is taken over", runners=dead
                )
                _nudge(_stage_nudges(ctx).values())
        await ctx.clock.wait(ctx.stopping, every)


async def remove_leftover_temporaries(ctx: Context) -> None:
    """Remove the outbox's and the archive's temporaries of runners that are gone (none of a
    live one's)."""
    live = {runner_token(runner.id) for runner in await ctx.store.runners()}
    paths = ctx.config.paths
    removed: list[Path] = []
    for root in (paths.outbox, paths.archive):
        try:
            if root.is_dir():
                removed += await anyio.to_thread.run_sync(remove_dead_temporaries, root, live)
        except OSError as exc:  # left for the next sweep: never a reason to stop the runner
            log.warning(
                "cannot remove the temporaries of runners gone",
                folder=names.shown(str(root)),
                error=names.shown(str(exc)),
            )
    if removed:
        log.info("temporaries of runners gone removed", count=len(removed))


async def _renew_or_rejoin(ctx: Context) -> None:
    try:
        await ctx.store.heartbeat()
    except ClaimLostError as exc:
        log.warning(
            "declared dead by the other runners; joining again, the work it held is dropped",
            runner=ctx.runner_id,
            reason=exc.message,
        )
        await ctx.store.join()
        _nudge(_stage_nudges(ctx).values())  # claim afresh what nobody has taken yet


async def follow_wake_ups(ctx: Context) -> None:
    """Nudge the stages other runners gave work to; listen again after a lost connection."""
    nudges = _stage_nudges(ctx)
    while not ctx.stopping.is_set():
        try:
            async with ctx.store.wake_ups() as stages:
                _nudge(nudges.values())  # what was missed while not listening
                async for stage in stages:
                    if (nudge := nudges.get(stage)) is not None:
                        nudge.set()
        except StoreUnavailableError as exc:
            ctx.store_health.failed(exc.message, now=ctx.clock.wall())
        await ctx.clock.wait(ctx.stopping, STORE_RETRY_SECONDS)


def _stage_nudges(ctx: Context) -> dict[str, Nudge]:
    return {"submit": ctx.nudges.submit, "poll": ctx.nudges.poll, "deliver": ctx.nudges.deliver}


def _nudge(nudges: Iterable[Nudge]) -> None:
    for nudge in nudges:
        nudge.set()


def _first_message(group: BaseExceptionGroup[StoreUnavailableError]) -> str:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, StoreUnavailableError)
    return leaf.message
