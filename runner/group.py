"""The grouper: when an open ``folder`` or ``window`` group is closed and becomes one call.

``file`` groups are born ready. A folder closes when it holds a ``.ready`` marker or has been
quiet for the settle time with no unsettled file left in it; a window closes when it is full
(checked as files are added) or old enough. A drain closes everything once the inbox is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from runner.context import MIN_WAIT, Context
from runner.store.base import GroupRow

log = structlog.get_logger("runner.group")

READY_MARKER = ".ready"


@dataclass(frozen=True)
class GroupFacts:
    """What the decision needs to know besides the row itself."""

    now: float
    settle_seconds: float
    window_seconds: float | None
    ready_marker: bool
    unsettled_inside: bool
    inbox_taken: bool


def should_close(group: GroupRow, facts: GroupFacts) -> bool:
    if group.state != "open":
        return False
    if facts.inbox_taken:
        return True
    if group.mode == "folder":
        if facts.unsettled_inside:
            return False
        # compared as next_check computes it, so a group looked at on time does close
        quiet = facts.now >= group.last_added_at + facts.settle_seconds
        return facts.ready_marker or quiet
    if group.mode == "window" and facts.window_seconds is not None:
        return facts.now >= group.opened_at + facts.window_seconds
    return True


def next_check(group: GroupRow, facts: GroupFacts) -> float:
    """The latest time by which this open group should be looked at again."""
    if group.mode == "window" and facts.window_seconds is not None:
        return group.opened_at + facts.window_seconds
    return group.last_added_at + max(facts.settle_seconds, MIN_WAIT)


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
        """Close what is due; return how long until the next group may become due."""
        ctx = self._ctx
        now = ctx.clock.wall()
        soonest = ctx.config.inbox.rescan_seconds
        closed = 0
        for group in await ctx.store.open_groups():
            facts = self._facts(group, now)
            if should_close(group, facts):
                await ctx.store.close_group(group.id)
                closed += 1
                log.info(
                    "group closed",
                    group=group.group_key,
                    files=group.file_count,
                    callReferenceID=group.call_reference_id,
                )
            else:
                soonest = min(soonest, max(next_check(group, facts) - now, MIN_WAIT))
        if closed:
            ctx.nudges.submit.set()
        return soonest

    def _facts(self, group: GroupRow, now: float) -> GroupFacts:
        ctx = self._ctx
        window_seconds: float | None = None
        if group.mode == "window":
            index = int(group.group_key.split(":", 1)[1])
            window_seconds = ctx.config.routes[index].batch_window_seconds
        folder = ctx.config.paths.inbox / group.group_key
        return GroupFacts(
            now=now,
            settle_seconds=ctx.config.inbox.settle_seconds,
            window_seconds=window_seconds,
            ready_marker=group.mode == "folder" and _exists(folder / READY_MARKER),
            unsettled_inside=group.mode == "folder" and self._unsettled_under(group.group_key),
            inbox_taken=ctx.inbox_taken.is_set(),
        )


def _exists(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False
