"""The poller: follows every open call to a terminal state.

In v3 mode one ``GET /v3/calls?callIDs=...`` answers for many calls at once; each call keeps its
own exponential schedule with jitter. In v2 mode each call is read with ``GET /v2/calls/{id}``
and, once terminal, its outputs are read once with ``GET /v3/calls/{id}`` (v2 calls carry none).
A call older than ``poll.give_up_after`` ends as "timed out".
"""

from __future__ import annotations

import anyio
import structlog

from runner import faults
from runner.api.models import Call
from runner.context import Context
from runner.errors import ApiError, AuthError, NotFoundError, TransientError
from runner.policy import poll_delay
from runner.store.base import GroupRow

log = structlog.get_logger("runner.poll")

AUTH_RETRY_SECONDS = 60.0


class Poller:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def run(self) -> None:
        ctx = self._ctx
        while not ctx.stopping.is_set():
            wait = await self.poll_due()
            await ctx.nudges.poll.wait(wait)

    async def poll_due(self) -> float:
        """Poll every call that is due, a page at a time; return the idle wait."""
        ctx = self._ctx
        limit = ctx.config.poll.calls_per_request
        while not ctx.stopping.is_set():
            now = ctx.clock.wall()
            # calls due soon ride along with the ones due now: one request instead of many
            due = await ctx.store.due_polls(now=now + ctx.config.poll.initial_seconds, limit=limit)
            if not due or due[0].not_before > now:
                break
            try:
                if ctx.config.api.version == "v2":
                    await self._poll_v2(due)
                else:
                    await self._poll_v3(due)
            except ApiError as exc:
                await self._failed(due, exc)
                return 1.0
        next_due = await ctx.store.next_due()
        if next_due is None:
            return ctx.config.poll.max_seconds
        return max(next_due - ctx.clock.wall(), 0.05)

    async def _poll_v3(self, due: list[GroupRow]) -> None:
        ctx = self._ctx
        faults.point("poll.before_send")
        calls = await ctx.client.list_calls(call_ids=[g.call_id or "" for g in due], limit=len(due))
        faults.point("poll.after_receive")
        by_id = {call.call_id: call for call in calls}
        reschedule: list[tuple[int, float, str | None]] = []
        for group in due:
            call = by_id.get(group.call_id or "")
            if call is None and self._listing_should_show(group):
                call = await self._get_one(group)
            if call is not None and call.is_terminal:
                await self._finished(group, call)
            elif not await self._gave_up(group, call.status if call else group.status):
                reschedule.append(self._next_poll(group, call.status if call else group.status))
        await ctx.store.reschedule_polls(reschedule)

    async def _poll_v2(self, due: list[GroupRow]) -> None:
        ctx = self._ctx
        reschedule: list[tuple[int, float, str | None]] = []
        for group in due:
            try:
                faults.point("poll.before_send")
                v2 = await ctx.client.get_call_v2(group.call_id or "")
                faults.point("poll.after_receive")
            except NotFoundError:
                await self._lost(group)
                continue
            if v2.is_terminal:
                await self._finished(group, await ctx.client.get_call(v2.call_id))
            elif not await self._gave_up(group, v2.status):
                reschedule.append(self._next_poll(group, v2.status))
        await ctx.store.reschedule_polls(reschedule)

    def _listing_should_show(self, group: GroupRow) -> bool:
        submitted = group.submitted_at or group.sent_at or 0.0
        return self._ctx.clock.wall() - submitted >= self._ctx.config.api.visibility_window

    async def _get_one(self, group: GroupRow) -> Call | None:
        try:
            return await self._ctx.client.get_call(group.call_id or "")
        except NotFoundError:
            await self._lost(group)
            return None

    def _next_poll(self, group: GroupRow, status: str | None) -> tuple[int, float, str | None]:
        poll = self._ctx.config.poll
        delay = poll_delay(
            group.attempts + 1,
            initial=poll.initial_seconds,
            maximum=poll.max_seconds,
            rng=self._ctx.rng,
        )
        return group.id, self._ctx.clock.wall() + delay, status

    async def _gave_up(self, group: GroupRow, status: str | None) -> bool:
        ctx = self._ctx
        age = ctx.clock.wall() - (group.submitted_at or group.opened_at)
        if age < ctx.config.poll.give_up_after:
            return False
        reason = (
            f"timed out: call {group.call_id} still {status or 'unfinished'} after "
            f"{age:.0f} s (poll.give_up_after)"
        )
        await self._terminal(group, "failed", None, reason)
        return True

    async def _lost(self, group: GroupRow) -> None:
        await self._terminal(group, "failed", None, f"bem no longer knows call {group.call_id}")

    async def _finished(self, group: GroupRow, call: Call) -> None:
        await self._terminal(
            group,
            call.status or "failed",
            call.model_dump_json(by_alias=True, exclude_unset=True),
            None,
        )

    async def _terminal(
        self, group: GroupRow, status: str, result_json: str | None, reason: str | None
    ) -> None:
        ctx = self._ctx
        now = ctx.clock.wall()
        await ctx.store.mark_terminal(
            group.id, status=status, result_json=result_json, error_reason=reason, now=now
        )
        if ctx.on_call_finished is not None and group.submitted_at is not None:
            ctx.on_call_finished(now - group.submitted_at)
        log.info(
            "call finished",
            callID=group.call_id,
            callReferenceID=group.call_reference_id,
            status=status,
            reason=reason,
        )
        ctx.nudges.deliver.set()
        ctx.nudges.submit.set()

    async def _failed(self, due: list[GroupRow], exc: ApiError) -> None:
        ctx = self._ctx
        now = ctx.clock.wall()
        if isinstance(exc, AuthError):
            ctx.health.auth_error = exc.message
            ctx.nudges.supervisor.set()
        elif isinstance(exc, TransientError) and exc.status_code is None:
            ctx.health.unreachable(now, exc.message)
            ctx.nudges.supervisor.set()
        log.warning("poll failed; will retry", error=exc.message, calls=len(due))
        delay = max(ctx.config.poll.initial_seconds, 1.0)
        if isinstance(exc, AuthError):
            delay = AUTH_RETRY_SECONDS  # one 401 a minute, not one a second
        await ctx.store.reschedule_polls([(g.id, now + delay, g.status) for g in due])
        await anyio.lowlevel.checkpoint()
