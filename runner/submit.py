"""The submitter: ready calls become bem calls, each sent at most once.

Before a POST the call is marked ``sending`` in the store (its ``callReferenceID`` was written
when the call was created). A POST whose outcome is unknown makes the call ``unknown``, which
:mod:`runner.resolve` settles by listing — never by sending blindly again. What a failure says
about the account (a rejected key, bem unreachable) is :mod:`runner.health`'s to keep.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from pathlib import Path

import anyio
import structlog

from runner import faults, names
from runner.api.models import UploadFile, V2Call, V2CallRequest
from runner.claims import unless_claim_lost
from runner.context import MIN_WAIT, Context
from runner.errors import (
    ApiError,
    AuthError,
    ClaimLostError,
    OutcomeUnknownError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from runner.health import AUTH_RETRY_SECONDS
from runner.policy import retry_delay
from runner.resolve import Resolver, recheck_seconds, record_call
from runner.store.base import CallRow, FileRow, Finished

log = structlog.get_logger("runner.submit")

NO_ROOM_WAIT = 1.0
"""With no room for another POST, how long the submitter idles unless told that room freed
(a POST ended, a call finished: both nudge it)."""

Sendable = list[tuple[CallRow, list[FileRow]]]
Preflight = Callable[[list[CallRow]], Awaitable[Sendable]]
"""Given ready calls, the ones still worth sending, with their files (the watcher checks them)."""


class Submitter:
    def __init__(self, ctx: Context, *, preflight: Preflight) -> None:
        self._ctx = ctx
        self._preflight = preflight
        self._posting: set[str] = set()
        """The callReferenceIDs of this process's POSTs not yet answered."""
        self._resolver = Resolver(ctx, posting=self._posting)
        self._in_flight = 0
        self._key_accepted = False
        self._next_auth_probe = 0.0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self) -> None:
        ctx = self._ctx
        async with anyio.create_task_group() as tg:
            while not ctx.stopping.is_set():
                wait = await self.submit_due(tg)
                await ctx.nudges.submit.wait(wait)
        # leaving the task group waits for every POST already sent

    async def submit_due(self, tg: anyio.abc.TaskGroup) -> float:
        """Start POSTs for due calls within the open-call budget; return the idle wait."""
        ctx = self._ctx
        await self._resolver.resolve_due()
        now = ctx.clock.wall()
        room = self._room(await ctx.store.open_call_count())
        if ctx.health.auth_error is not None:
            # a rejected key is a loud stop, not one 401 per file: one probe now and then
            if ctx.draining or now < self._next_auth_probe:
                return max(self._next_auth_probe - now, MIN_WAIT)
            self._next_auth_probe = now + AUTH_RETRY_SECONDS
            room = min(room, 1 - self._in_flight)
        elif not self._key_accepted:
            # until bem has answered once, one POST at a time: a bad key costs one 401
            room = min(room, 1 - self._in_flight)
        if room <= 0:
            return NO_ROOM_WAIT
        calls = await ctx.store.claim_ready(now=now, limit=room)
        try:
            sendable = await self._preflight(calls)
            if sendable and ctx.config.inbox.dedupe == "content":
                sendable = await self._without_duplicates(sendable)
            if sendable:
                await ctx.store.mark_sending([g.id for g, _ in sendable], now=ctx.clock.wall())
                faults.point("submit.after_commit")
        except ClaimLostError as exc:
            # nothing was sent: what is still ours goes back to whoever claims it next
            log.info(
                "claim lost; another runner has this work", action="submit", reason=exc.message
            )
            await ctx.store.release([g.id for g in calls])
            return MIN_WAIT
        requests = self._requests(sendable)
        for batch in requests:
            self._in_flight += 1
            tg.start_soon(self._send, batch, name=f"submit-{batch[0][0].call_reference_id}")
        if len(calls) == room:
            # More may be ready. A POST per claimed call spent the room; else look again soon.
            return NO_ROOM_WAIT if len(requests) == len(calls) else MIN_WAIT
        next_due = await ctx.store.next_submit_due()
        if next_due is None:
            return ctx.config.inbox.rescan_seconds
        return max(next_due - ctx.clock.wall(), MIN_WAIT)

    async def _without_duplicates(self, sendable: Sendable) -> Sendable:
        """Single files whose content has a completed result reuse it, and those whose content
        is already on its way wait for it (decided by the store, :mod:`runner.dedupe`)."""
        ctx = self._ctx
        single = [g.id for g, _ in sendable if not g.batch]
        settled = await ctx.store.settle_duplicates(single, now=ctx.clock.wall())
        skipped = {*settled.reused, *settled.waiting}
        if not skipped:
            return sendable
        for call, files in sendable:
            if call.id in skipped:
                log.info(
                    "result reused" if call.id in settled.reused else "waiting for a duplicate",
                    file=names.shown(files[0].rel) if files else None,
                    sha256=files[0].sha256 if files else None,
                    callReferenceID=call.call_reference_id,
                )
        if settled.reused:
            ctx.nudges.deliver.set()
        return [(g, files) for g, files in sendable if g.id not in skipped]

    def _room(self, open_calls: int) -> int:
        limits = self._ctx.config.limits
        return min(limits.max_open_calls - open_calls, limits.max_concurrency * 2 - self._in_flight)

    def _requests(self, sendable: Sendable) -> list[Sendable]:
        """The calls as requests: one per POST in v3, up to ``v2_calls_per_request`` in v2."""
        api = self._ctx.config.api
        size = api.v2_calls_per_request if api.version == "v2" else 1
        return [sendable[start : start + size] for start in range(0, len(sendable), size)]

    async def _send(self, batch: Sendable) -> None:
        references = {call.call_reference_id for call, _ in batch}
        self._posting.update(references)
        try:
            # a POST already sent finishes even during shutdown, so its outcome is recorded
            with anyio.CancelScope(shield=True), _unless_lost(batch[0][0]):
                if self._ctx.config.api.version == "v2":
                    await self._send_v2(batch)
                else:
                    call, files = batch[0]
                    await self._send_v3(call, files)
        finally:
            self._posting.difference_update(references)
            self._in_flight -= 1
            # refill in pages, not one query round per finished POST (a failure nudges itself)
            if self._in_flight <= self._ctx.config.limits.max_concurrency:
                self._ctx.nudges.submit.set()

    async def _send_v3(self, group: CallRow, files: list[FileRow]) -> None:
        ctx = self._ctx
        uploads = _uploads(ctx.config.paths.inbox, group, files)
        multipart = sum(f.size for f in files) >= ctx.config.api.multipart_min_bytes
        # a claim lost meanwhile raises here, and _send logs it: the POST never goes out
        await ctx.store.confirm_sending([group.id], now=ctx.clock.wall())
        try:
            faults.point("submit.before_send")
            call = await ctx.client.invoke_workflow(
                group.workflow,
                uploads,
                call_reference_id=group.call_reference_id,
                batch=group.batch,
                multipart=multipart,
            )
            faults.point("submit.after_receive")
        except ApiError as exc:
            await self._failed([group], exc)
            return
        self._key_accepted = True
        await record_call(ctx, group, call.call_id, call.status)

    async def _send_v2(self, batch: Sendable) -> None:
        ctx = self._ctx
        batch = await self._still_held(batch)
        if not batch:
            return
        requests = [
            V2CallRequest(
                workflow_name=group.workflow,
                call_reference_id=group.call_reference_id,
                files=tuple(_uploads(ctx.config.paths.inbox, group, files)),
                batch=group.batch,
            )
            for group, files in batch
        ]
        groups = [group for group, _ in batch]
        try:
            faults.point("submit.before_send")
            calls = await ctx.client.create_calls_v2(requests)
            faults.point("submit.after_receive")
        except ApiError as exc:
            # call by call: one taken over by another runner leaves the others to record
            for group in groups:
                with _unless_lost(group):
                    await self._failed([group], exc)
            return
        self._key_accepted = True
        by_reference: dict[str, V2Call] = {c.call_reference_id or "": c for c in calls}
        for group in groups:
            call = by_reference.get(group.call_reference_id)
            with _unless_lost(group):
                if call is None:
                    await ctx.store.mark_unknown([group.id], not_before=ctx.clock.wall())
                else:
                    await record_call(ctx, group, call.call_id, call.status)

    async def _still_held(self, batch: Sendable) -> Sendable:
        """The calls of a POST about to go out that this runner still holds (see
        :meth:`Store.confirm_sending`); the others are left to whoever took them over."""
        store, now = self._ctx.store, self._ctx.clock.wall()
        try:
            await store.confirm_sending([call.id for call, _ in batch], now=now)
            return batch
        except ClaimLostError:
            pass  # some were taken over: find which, one by one (rare)
        held: Sendable = []
        for call, files in batch:
            with _unless_lost(call):
                await store.confirm_sending([call.id], now=now)
                held.append((call, files))
        return held

    async def _failed(self, calls: list[CallRow], exc: ApiError) -> None:
        """What a failed POST means for its calls: resolve, wait, stop, fail or retry."""
        ctx = self._ctx
        ctx.nudges.submit.set()
        now = ctx.clock.wall()
        ids = [g.id for g in calls]
        refs = [g.call_reference_id for g in calls]
        if exc.status_code is not None and not isinstance(exc, AuthError):
            self._key_accepted = True  # bem answered, and not about the key
        if ctx.health.failed(exc, now=now):
            ctx.nudges.supervisor.set()
        if isinstance(exc, OutcomeUnknownError):
            log.warning("submit outcome unknown", callReferenceIDs=refs, error=exc.message)
            await ctx.store.mark_unknown(ids, not_before=now + recheck_seconds(ctx))
        elif isinstance(exc, RateLimitedError):
            # the shared limiter already holds every request until Retry-After has passed
            log.info("submit rate limited", callReferenceIDs=refs, retry_after=exc.retry_after)
            await ctx.store.mark_submit_later(ids, not_before=now)
        elif isinstance(exc, AuthError):
            self._next_auth_probe = now + AUTH_RETRY_SECONDS
            log.error(
                "bem rejected the API key; nothing is sent until it is fixed, probing every "
                f"{AUTH_RETRY_SECONDS:.0f} s",
                error=exc.message,
            )
            await ctx.store.mark_submit_later(ids, not_before=now)
        elif isinstance(exc, PermanentError):
            reason = f"bem rejected the call: {exc.message}"
            await ctx.store.mark_terminal(
                [Finished(g.id, "failed", None, reason) for g in calls], now=now
            )
            log.warning("call rejected", callReferenceIDs=refs, reason=reason)
            ctx.nudges.deliver.set()
        else:
            attempts = max(g.attempts for g in calls)
            retry_after = exc.retry_after if isinstance(exc, TransientError) else None
            delay = retry_delay(attempts, rng=ctx.rng, retry_after=retry_after)
            log.warning(
                "submit failed; will retry", callReferenceIDs=refs, error=exc.message, delay=delay
            )
            await ctx.store.mark_submit_later(ids, not_before=now + delay)


def _unless_lost(call: CallRow) -> AbstractContextManager[None]:
    return unless_claim_lost("record the POST's outcome", callReferenceID=call.call_reference_id)


def _uploads(inbox: Path, call: CallRow, files: list[FileRow]) -> list[UploadFile]:
    return [
        UploadFile(
            path=inbox / file.rel,
            input_type=file.input_type or "",
            item_reference_id=file.item_reference_id if call.batch else None,
        )
        for file in files
    ]


__all__ = ["Preflight", "Sendable", "Submitter"]
