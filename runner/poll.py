"""The poller: follows every open call to a terminal state.

One ``GET /v3/calls?callIDs=...`` answers for many calls at once; when each call is polled next
is :mod:`runner.schedule`'s (a shared grid, learnt latencies, the rate and request budget),
relaxed while webhook events flow (:mod:`runner.webhook_policy`). Calls created with
``POST /v2/calls`` are followed the same way: a v2 call is a bem call like any other, and
``GET /v2/calls/{id}`` would answer for one call at a time and without its outputs.
A call older than ``poll.give_up_after`` ends as "timed out".
"""

from __future__ import annotations

from datetime import datetime

import anyio
import msgspec
import structlog

from runner import faults
from runner.api import call_mismatch
from runner.api.models import Call, CallFilter
from runner.claims import unless_claim_lost
from runner.context import MIN_WAIT, Context
from runner.errors import ApiError, AuthError, NotFoundError
from runner.health import AUTH_RETRY_SECONDS
from runner.schedule import Outlook, grid_for, next_poll_at, ride_along_seconds
from runner.store.base import CallRow, Finished, NextPoll

log = structlog.get_logger("runner.poll")

CLAIMED_ELSEWHERE_WAIT = 0.5
"""Calls are due but other runners sharing the store hold them: look again this much later."""


class PollPage(msgspec.Struct):
    """What one page of polls found: calls that ended, and when to look at the others again."""

    calls: list[CallRow] = msgspec.field(default_factory=list)
    finished: list[Finished] = msgspec.field(default_factory=list)
    next_polls: list[NextPoll] = msgspec.field(default_factory=list)

    def ended(
        self, call: CallRow, status: str, result_json: str | None, reason: str | None
    ) -> None:
        self.calls.append(call)
        self.finished.append(Finished(call.id, status, result_json, reason))


class Poller:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._item_references: dict[int, frozenset[str]] = {}
        """The itemReferenceIDs each polled batch call sent, to check what bem answers."""
        self._newly_learnt: set[str] = set()
        """Workflows whose latencies were learnt in this page: their calls are rescheduled."""

    async def run(self) -> None:
        ctx = self._ctx
        while not ctx.stopping.is_set():
            wait = await self.poll_due()
            await ctx.nudges.poll.wait(wait)

    async def poll_due(self) -> float:
        """Poll every call that is due, a page at a time; return the idle wait."""
        ctx = self._ctx
        limit = ctx.config.poll.calls_per_request
        ride = ctx.config.poll.initial_seconds
        planned = False
        while not ctx.stopping.is_set():
            now = ctx.clock.wall()
            next_due = await ctx.store.next_poll_due()
            if next_due is None:
                return ctx.config.poll.max_seconds
            if next_due > now:
                return max(next_due - now, MIN_WAIT)
            if not planned:  # once per pass: the grid for the calls polled in it
                ride = await self._plan(now)
                planned = True
            # calls due soon ride along with the ones due now: one request instead of many
            due = await ctx.store.claim_due_polls(now=now + ride, limit=limit)
            if not due:  # what is due is another runner's to poll now
                return CLAIMED_ELSEWHERE_WAIT
            announced = any(call.event_at is not None for call in due)
            if not ctx.poll_plan.may_send(
                now, calls=len(due), per_request=limit, announced=announced
            ):
                await ctx.store.release([g.id for g in due])
                return max(ctx.poll_plan.next_slot_in(now), MIN_WAIT)  # the next grid point
            await self._load_item_references(due)
            try:
                await self._poll_v3(due)
            except ApiError as exc:
                await self._failed(due, exc)
                return 1.0
        return 0.0

    async def _plan(self, now: float) -> float:
        """Choose the grid from what is pending and learnt; return the ride-along window."""
        ctx = self._ctx
        plan, poll = ctx.poll_plan, ctx.config.poll
        if plan.longest == 0:
            plan.grid = None  # nothing learnt yet: today's exponential schedule, uncapped
        else:
            outlook = Outlook(
                submits_pending=await ctx.store.next_submit_due() is not None,
                rate=ctx.config.limits.requests_per_second,
                open_calls=await ctx.store.open_call_count(),
                calls_per_request=poll.calls_per_request,
                credits=plan.credits,
                horizon=plan.horizon(now),
            )
            plan.grid = grid_for(outlook, base=poll.initial_seconds)
        flow = ctx.webhook_flow
        return ride_along_seconds(
            plan.grid,
            initial=poll.initial_seconds,
            events_flowing=flow is not None and flow.flowing(now),
        )

    async def _load_item_references(self, due: list[CallRow]) -> None:
        batches = [g.id for g in due if g.batch]
        files = await self._ctx.store.files_of_calls(batches) if batches else {}
        self._item_references = {
            gid: frozenset(f.item_reference_id for f in rows if f.item_reference_id)
            for gid, rows in files.items()
        }

    async def _poll_v3(self, due: list[CallRow]) -> None:
        ctx = self._ctx
        faults.point("poll.before_send")
        wanted = CallFilter(call_ids=tuple(g.call_id or "" for g in due))
        ctx.poll_plan.sent(ctx.clock.wall())
        calls = await ctx.client.list_calls(wanted, limit=len(due))
        faults.point("poll.after_receive")
        by_id = {call.call_id: call for call in calls}
        page = PollPage()
        for group in due:
            call = by_id.get(group.call_id or "")
            if call is None and self._listing_should_show(group):
                call = await self._get_one(group, page)
                if call is None:
                    continue
            self._follow(page, group, call.status if call else group.status, call)
        await self._record(page)

    def _follow(
        self, page: PollPage, group: CallRow, status: str | None, call: Call | None
    ) -> None:
        """A terminal call ends; one followed too long gives up; the others poll again later.

        A bem call that is not the one this call sent (:func:`runner.api.call_mismatch`) is never
        trusted: the call ends with that reason and its files get error documents.
        """
        if call is not None and (reason := self._mismatch(group, call)):
            log.error(
                "bem answered with another call's data; not trusted",
                callID=group.call_id,
                callReferenceID=group.call_reference_id,
                reason=reason,
            )
            page.ended(group, "failed", None, reason)
        elif call is not None and call.is_terminal:
            self._learn(group, call)
            result = call.sent_json()
            page.ended(group, call.status or "failed", result, None)
        elif (reason := self._gave_up(group, status)) is not None:
            page.ended(group, "failed", None, reason)
        else:
            page.next_polls.append(self._next_poll(group, status))

    def _learn(self, group: CallRow, call: Call) -> None:
        """How long the call took, by bem's clock (or, lacking it, since it was submitted)."""
        seconds = _seconds_between(call.created_at, call.finished_at)
        if seconds is None and group.submitted_at is not None:
            seconds = self._ctx.clock.wall() - group.submitted_at
        if seconds is not None and self._ctx.poll_plan.learn(group.workflow, seconds):
            self._newly_learnt.add(group.workflow)

    def _mismatch(self, group: CallRow, call: Call) -> str | None:
        return call_mismatch(
            call,
            call_reference_id=group.call_reference_id,
            item_reference_ids=self._item_references.get(group.id) if group.batch else None,
        )

    def _listing_should_show(self, call: CallRow) -> bool:
        submitted = call.submitted_at or call.sent_at or 0.0
        return self._ctx.clock.wall() - submitted >= self._ctx.config.api.visibility_window

    async def _get_one(self, call: CallRow, page: PollPage) -> Call | None:
        try:
            self._ctx.poll_plan.sent(self._ctx.clock.wall())
            return await self._ctx.client.get_call(call.call_id or "")
        except NotFoundError:
            page.ended(call, *self._lost(call))
            return None

    def _next_poll(self, call: CallRow, status: str | None) -> NextPoll:
        ctx = self._ctx
        poll, plan = ctx.config.poll, ctx.poll_plan
        now = ctx.clock.wall()
        at = next_poll_at(
            now=now,
            submitted_at=call.submitted_at if call.submitted_at is not None else call.opened_at,
            attempts=call.attempts + 1,
            latencies=plan.latencies(call.workflow),
            tick=plan.tick,
            initial=poll.initial_seconds,
            maximum=poll.max_seconds,
            rng=ctx.rng,
        )
        if self._ctx.webhook_flow is not None:  # events flowing: a long safety-net interval
            at = self._ctx.webhook_flow.poll_at(call, at, now=now)
        return NextPoll(call.id, at, status, seen_event_at=call.event_at or 0.0)

    def _gave_up(self, call: CallRow, status: str | None) -> str | None:
        """Why a call followed longer than ``poll.give_up_after`` ends; None while it may go on."""
        ctx = self._ctx
        age = ctx.clock.wall() - (call.submitted_at or call.opened_at)
        if age < ctx.config.poll.give_up_after:
            return None
        return (
            f"timed out: call {call.call_id} still {status or 'unfinished'} after "
            f"{age:.0f} s (poll.give_up_after)"
        )

    @staticmethod
    def _lost(call: CallRow) -> tuple[str, None, str]:
        return "failed", None, f"bem no longer knows call {call.call_id}"

    async def _record(self, page: PollPage) -> None:
        """One transaction for the page, then a log line per call that ended."""
        ctx = self._ctx
        ctx.health.reached()
        now = ctx.clock.wall()
        recorded = False
        with unless_claim_lost("record polls", calls=len(page.finished) + len(page.next_polls)):
            await ctx.store.record_polls(page.finished, page.next_polls, now=now)
            recorded = True
        if not recorded:  # those still ours are polled again
            return
        for call, finished in zip(page.calls, page.finished, strict=True):
            if ctx.on_call_finished is not None and call.submitted_at is not None:
                ctx.on_call_finished(now - call.submitted_at)
            log.info(
                "call finished",
                callID=call.call_id,
                callReferenceID=call.call_reference_id,
                status=finished.status,
                reason=finished.error_reason,
            )
        if page.finished:
            ctx.nudges.deliver.set()
            ctx.nudges.submit.set()
        if self._newly_learnt:
            await self._reschedule_learnt()

    async def _reschedule_learnt(self) -> None:
        """Calls scheduled before their workflow's latencies were known move to the schedule
        that knows them (an exponential wait would otherwise still hold them back)."""
        ctx = self._ctx
        workflows, self._newly_learnt = self._newly_learnt, set()
        now = ctx.clock.wall()
        await self._plan(now)  # the grid, now that something is learnt
        horizon = now + ctx.config.poll.max_seconds + ctx.config.poll.initial_seconds
        waiting = await ctx.store.due_polls(now=horizon, limit=ctx.config.limits.max_open_calls)
        with unless_claim_lost("reschedule polls"):  # one another runner polls meanwhile
            await ctx.store.reschedule_polls(
                [self._next_poll(g, g.status) for g in waiting if g.workflow in workflows]
            )

    async def _failed(self, due: list[CallRow], exc: ApiError) -> None:
        ctx = self._ctx
        now = ctx.clock.wall()
        if ctx.health.failed(exc, now=now):
            ctx.nudges.supervisor.set()
        log.warning("poll failed; will retry", error=exc.message, calls=len(due))
        delay = max(ctx.config.poll.initial_seconds, 1.0)
        if isinstance(exc, AuthError):
            delay = AUTH_RETRY_SECONDS  # one 401 a minute, not one a second
        with unless_claim_lost("poll again later", calls=len(due)):
            await ctx.store.reschedule_polls([NextPoll(g.id, now + delay, g.status) for g in due])
        await anyio.lowlevel.checkpoint()


def _seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one of bem's ISO 8601 timestamps to another; None if either is missing."""
    if not start or not end:
        return None
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
