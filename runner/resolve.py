"""Unknown outcomes: a POST that may or may not have created its call is never sent blindly again.

The call's ``callReferenceID`` was journalled before the POST. Calls with that reference are
listed (``GET /v3/calls?referenceIDs=...``): one found is adopted; not finding it proves nothing
until the listing has had ``api.visibility_window`` to show it, and only then is the call sent
again (:func:`runner.policy.unknown_outcome_resolution`). A call this very process still has a
POST out for (it was declared dead meanwhile, and its ``sending`` became ``unknown``) is left to
that POST's answer instead, and its claim given back: the POST may still be queued behind the
rate limit, so the window proves nothing.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

import structlog

from runner import faults
from runner.api.models import Call, CallFilter
from runner.claims import unless_claim_lost
from runner.context import Context
from runner.errors import ApiError
from runner.policy import unknown_outcome_resolution
from runner.schedule import next_poll_at
from runner.store.base import CallRow
from runner.webhook_policy import CONFIRM_WINDOW_SECONDS

log = structlog.get_logger("runner.resolve")

UNKNOWN_RECHECK_SECONDS = 2.0
"""How soon an unresolved call is listed again (at most half the visibility window)."""
LIST_REFERENCES_PER_REQUEST = 50


async def record_call(ctx: Context, call: CallRow, call_id: str, status: str | None) -> None:
    """bem has a call for this row (answered by its POST, or found by listing): follow it."""
    ctx.health.reached()
    now = ctx.clock.wall()
    next_poll = first_poll_at(ctx, call.workflow, now=now)
    flow = ctx.webhook_flow
    if flow is not None:
        next_poll = flow.first_poll_at(next_poll, now=now)
    await ctx.store.mark_submitted(
        call.id, call_id=call_id, status=status, now=now, next_poll=next_poll
    )
    if flow is not None:  # events that came before this answer: confirm the call now
        await ctx.store.claim_webhook_events(
            call.id,
            call_id=call_id,
            call_reference_id=call.call_reference_id,
            now=now,
            confirm_at=now + CONFIRM_WINDOW_SECONDS,
        )
    log.info(
        "call submitted",
        callID=call_id,
        callReferenceID=call.call_reference_id,
        workflow=call.workflow,
        batch=call.batch_key,
        files=call.file_count,
    )
    ctx.nudges.poll.set_unless_due_later(next_poll)


def first_poll_at(ctx: Context, workflow: str, *, now: float) -> float:
    """A new call's first poll: once its workflow's fastest calls finish, or after
    ``poll.initial_seconds`` while nothing is learnt (:mod:`runner.schedule`)."""
    plan = ctx.poll_plan
    plan.started(now)
    latencies = plan.latencies(workflow)
    poll = ctx.config.poll
    if latencies is None or plan.tick is None:
        return now + poll.initial_seconds
    return next_poll_at(
        now=now,
        submitted_at=now,
        attempts=0,
        latencies=latencies,
        tick=plan.tick,
        initial=poll.initial_seconds,
        maximum=poll.max_seconds,
        rng=ctx.rng,
    )


def recheck_seconds(ctx: Context) -> float:
    return min(UNKNOWN_RECHECK_SECONDS, ctx.config.api.visibility_window / 2)


class Resolver:
    """Resolves the calls whose POST outcome is unknown, a page of references at a time."""

    def __init__(self, ctx: Context, *, posting: Set[str] = frozenset()) -> None:
        self._ctx = ctx
        self._posting = posting

    async def resolve_due(self) -> None:
        """Adopt calls that were created after all; resend those that surely were not."""
        ctx = self._ctx
        now = ctx.clock.wall()
        # a POST not out before the claim was answered (and recorded) before it: its row is fresh
        posting = set(self._posting)
        calls = await ctx.store.claim_due_unknown(now=now, limit=LIST_REFERENCES_PER_REQUEST)
        posting |= self._posting
        answering = [g.id for g in calls if g.call_reference_id in posting]
        if answering:
            await ctx.store.release(answering)
            calls = [g for g in calls if g.call_reference_id not in posting]
        if not calls:
            return
        try:
            found = await self._find_by_reference([g.call_reference_id for g in calls])
        except ApiError as exc:
            log.warning("cannot list calls to resolve unknown outcomes", error=exc.message)
            if ctx.health.failed(exc, now=now):
                ctx.nudges.supervisor.set()
            with unless_claim_lost("list unknown outcomes again later"):
                await ctx.store.mark_unknown(
                    [g.id for g in calls], not_before=now + recheck_seconds(ctx)
                )
            return
        for call in calls:
            with unless_claim_lost(
                "resolve an unknown outcome", callReferenceID=call.call_reference_id
            ):
                await self._decide(call, found.get(call.call_reference_id), now)
        ctx.nudges.submit.set()

    async def _decide(self, group: CallRow, call: Call | None, now: float) -> None:
        ctx = self._ctx
        decision = unknown_outcome_resolution(
            now=now,
            sent_at=group.sent_at or now,
            visibility_window=ctx.config.api.visibility_window,
            found=call is not None,
        )
        if call is not None:
            log.info(
                "adopted call created by an earlier attempt",
                callID=call.call_id,
                callReferenceID=group.call_reference_id,
            )
            await record_call(ctx, group, call.call_id, call.status)
        elif decision == "wait":
            await ctx.store.mark_unknown([group.id], not_before=now + recheck_seconds(ctx))
        else:
            log.info(
                "call was never created; sending again", callReferenceID=group.call_reference_id
            )
            await ctx.store.mark_submit_later([group.id], not_before=now)

    async def _find_by_reference(self, references: Sequence[str]) -> dict[str, Call]:
        found: dict[str, Call] = {}
        faults.point("submit.before_list")
        wanted = CallFilter(reference_ids=tuple(references), sort_order="asc")
        async for call in self._ctx.client.iter_calls(wanted):
            # the oldest call with a reference wins, should a duplicate ever exist
            if call.call_reference_id and call.call_reference_id not in found:
                found[call.call_reference_id] = call
        faults.point("submit.after_list")
        return found
