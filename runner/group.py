"""The grouper: when a collecting ``folder`` or ``window`` batch is closed and becomes one bem call.

``file`` calls are born ready. A folder closes when it holds a ``.ready`` marker or has been
quiet for the settle time with no unsettled file left in it; a window closes when it is full
(checked as files are added) or old enough. A drain closes everything once the inbox is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog

from runner.context import MIN_WAIT, Context
from runner.store.base import CallRow

log = structlog.get_logger("runner.group")

READY_MARKER = ".ready"


class CallFacts(msgspec.Struct, frozen=True):
    """What the decision needs to know besides the row itself."""

    now: float
    settle_seconds: float
    window_seconds: float | None
    ready_marker: bool
    unsettled_inside: bool
    inbox_taken: bool


def should_close(call: CallRow, facts: CallFacts) -> bool:
    if call.state != "collecting":
        return False
    if facts.inbox_taken:
        return True
    if call.mode == "folder":
        if facts.unsettled_inside:
            return False
        # compared as next_check computes it, so a call looked at on time does close
        quiet = facts.now >= call.last_added_at + facts.settle_seconds
        return facts.ready_marker or quiet
    if call.mode == "window" and facts.window_seconds is not None:
        return facts.now >= call.opened_at + facts.window_seconds
    return True


def next_check(call: CallRow, facts: CallFacts) -> float:
    """The latest time by which this collecting call should be looked at again."""
    if call.mode == "window" and facts.window_seconds is not None:
        return call.opened_at + facts.window_seconds
    return call.last_added_at + max(facts.settle_seconds, MIN_WAIT)


class Grouper:
    def __init__(self, ctx: Context, *, unsettled_under: Callable[[str], bool]) -> None:
        self._ctx = ctx
        self._unsettled_under = unsettled_under

    async def run(self) -> None:
        ctx = self._ctx
        while not ctx.stopping.is_set():
            wait = await self.close_due()
            await ctx.nudges.group.wait(wait)

    async def close_due(self) -> float:
        """Close what is due; return how long until the next call may become due."""
        ctx = self._ctx
        now = ctx.clock.wall()
        soonest = ctx.config.inbox.rescan_seconds
        closed = 0
        for call in await ctx.store.collecting_calls():
            facts = self._facts(call, now)
            if should_close(call, facts):
                await ctx.store.close_batch(call.id)
                closed += 1
                log.info(
                    "batch closed",
                    batch=call.batch_key,
                    files=call.file_count,
                    callReferenceID=call.call_reference_id,
                )
            else:
                soonest = min(soonest, max(next_check(call, facts) - now, MIN_WAIT))
        if closed:
            ctx.nudges.submit.set()
        return soonest

    def _facts(self, call: CallRow, now: float) -> CallFacts:
        ctx = self._ctx
        window_seconds: float | None = None
        if call.mode == "window":
            index = int(call.batch_key.split(":", 1)[1])
            window_seconds = ctx.config.routes[index].batch_window_seconds
        folder = ctx.config.paths.inbox / call.batch_key
        return CallFacts(
            now=now,
            settle_seconds=ctx.config.inbox.settle_seconds,
            window_seconds=window_seconds,
            ready_marker=call.mode == "folder" and _exists(folder / READY_MARKER),
            unsettled_inside=call.mode == "folder" and self._unsettled_under(call.batch_key),
            inbox_taken=ctx.inbox_taken.is_set(),
        )


def _exists(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False
