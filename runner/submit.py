"""The submitter: ready groups become bem calls, each sent at most once.

Before a POST the group is marked ``sending`` in the store (its ``callReferenceID`` was written
when the group was created). If the POST's outcome is unknown, the group becomes ``unknown`` and
is resolved by listing calls with its reference ID — adopted if found, resent only after the
visibility window has passed without it showing up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import structlog

from runner import faults
from runner.api.models import Call, UploadFile, V2Call, V2CallRequest
from runner.context import Context
from runner.errors import (
    ApiError,
    AuthError,
    OutcomeUnknownError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from runner.policy import retry_delay, unknown_outcome_resolution
from runner.store.base import FileRow, Finished, GroupRow

log = structlog.get_logger("runner.submit")

AUTH_RETRY_SECONDS = 60.0
UNKNOWN_RECHECK_SECONDS = 2.0
LIST_REFERENCES_PER_REQUEST = 50


class Submitter:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
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
        """Start POSTs for due groups within the open-call budget; return the idle wait."""
        ctx = self._ctx
        limits = ctx.config.limits
        await self.resolve_unknown()
        now = ctx.clock.wall()
        room = limits.max_open_calls - await ctx.store.open_call_count()
        room = min(room, limits.max_concurrency * 2 - self._in_flight)
        if ctx.health.auth_error is not None:
            # a rejected key is a loud stop, not one 401 per file: one probe now and then
            if ctx.draining or now < self._next_auth_probe:
                return max(self._next_auth_probe - now, 0.05)
            self._next_auth_probe = now + AUTH_RETRY_SECONDS
            room = min(room, 1 - self._in_flight)
        elif not self._key_accepted:
            # until bem has answered once, one POST at a time: a bad key costs one 401
            room = min(room, 1 - self._in_flight)
        if room <= 0:
            return 1.0
        groups = await ctx.store.ready_groups(now=now, limit=room)
        sendable = await self._preflight(groups)
        if sendable:
            await ctx.store.mark_sending([g.id for g, _ in sendable], now=ctx.clock.wall())
            faults.point("submit.after_commit")
        size = ctx.config.api.v2_calls_per_request if ctx.config.api.version == "v2" else 1
        for start in range(0, len(sendable), size):
            batch = sendable[start : start + size]
            self._in_flight += 1
            tg.start_soon(self._send, batch, name=f"submit-{batch[0][0].call_reference_id}")
        next_due = await ctx.store.next_submit_due()
        if len(groups) == room:
            return 0.05
        if next_due is None:
            return ctx.config.inbox.rescan_seconds
        return max(next_due - ctx.clock.wall(), 0.05)

    async def _preflight(self, groups: list[GroupRow]) -> list[tuple[GroupRow, list[FileRow]]]:
        """Drop files that vanished or changed since they were queued, and groups left empty."""
        ctx = self._ctx
        files_by_group = await ctx.store.files_of_groups([g.id for g in groups])
        sendable = []
        for group in groups:
            keep = [f for f in files_by_group[group.id] if await self._unchanged(group, f)]
            if keep:
                sendable.append((group, keep))
            else:
                await ctx.store.drop_empty_group(group.id)
        return sendable

    async def _unchanged(self, group: GroupRow, file: FileRow) -> bool:
        ctx = self._ctx
        try:
            st = (ctx.config.paths.inbox / file.rel).lstat()
        except OSError as exc:
            await ctx.store.reject_queued_file(
                file, f"the file vanished from the inbox before it was sent ({exc.strerror})"
            )
            log.warning("file vanished", file=file.rel, callReferenceID=group.call_reference_id)
            ctx.nudges.deliver.set()
            return False
        if (st.st_size, st.st_mtime_ns) != (file.size, file.mtime_ns):
            await ctx.store.supersede_file(file)
            ctx.known.pop(file.rel, None)
            ctx.nudges.intake.set()
            log.info("file changed after it was queued; taking it again", file=file.rel)
            return False
        return True

    async def _send(self, batch: list[tuple[GroupRow, list[FileRow]]]) -> None:
        try:
            # a POST already sent finishes even during shutdown, so its outcome is recorded
            with anyio.CancelScope(shield=True):
                if self._ctx.config.api.version == "v2":
                    await self._send_v2(batch)
                else:
                    group, files = batch[0]
                    await self._send_v3(group, files)
        finally:
            self._in_flight -= 1
            # refill in pages, not one query round per finished POST (a failure nudges itself)
            if self._in_flight <= self._ctx.config.limits.max_concurrency:
                self._ctx.nudges.submit.set()

    async def _send_v3(self, group: GroupRow, files: list[FileRow]) -> None:
        ctx = self._ctx
        uploads = _uploads(ctx.config.paths.inbox, group, files)
        multipart = sum(f.size for f in files) >= ctx.config.api.multipart_min_bytes
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
        await self._submitted(group, call.call_id, call.status, call)

    async def _send_v2(self, batch: list[tuple[GroupRow, list[FileRow]]]) -> None:
        ctx = self._ctx
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
            await self._failed(groups, exc)
            return
        by_reference: dict[str, V2Call] = {c.call_reference_id or "": c for c in calls}
        for group in groups:
            call = by_reference.get(group.call_reference_id)
            if call is None:
                await ctx.store.mark_unknown([group.id], not_before=ctx.clock.wall())
                continue
            await self._submitted(group, call.call_id, call.status, None)

    async def _submitted(
        self, group: GroupRow, call_id: str, status: str | None, call: Call | None
    ) -> None:
        ctx = self._ctx
        ctx.health.reached()
        self._key_accepted = True
        now = ctx.clock.wall()
        await ctx.store.mark_submitted(
            group.id,
            call_id=call_id,
            status=status,
            now=now,
            next_poll=now + ctx.config.poll.initial_seconds,
        )
        log.info(
            "call submitted",
            callID=call_id,
            callReferenceID=group.call_reference_id,
            workflow=group.workflow,
            group=group.group_key,
            files=group.file_count,
        )
        ctx.nudges.poll.set()

    async def _failed(self, groups: list[GroupRow], exc: ApiError) -> None:
        ctx = self._ctx
        ctx.nudges.submit.set()
        now = ctx.clock.wall()
        ids = [g.id for g in groups]
        refs = [g.call_reference_id for g in groups]
        if exc.status_code is not None and not isinstance(exc, AuthError):
            self._key_accepted = True  # bem answered, and not about the key
        if isinstance(exc, OutcomeUnknownError):
            log.warning("submit outcome unknown", callReferenceIDs=refs, error=exc.message)
            await ctx.store.mark_unknown(ids, not_before=now + self._recheck_seconds())
        elif isinstance(exc, RateLimitedError):
            # the shared limiter already holds every request until Retry-After has passed
            log.info("submit rate limited", callReferenceIDs=refs, retry_after=exc.retry_after)
            await ctx.store.mark_submit_later(ids, not_before=now)
        elif isinstance(exc, AuthError):
            ctx.health.auth_error = exc.message
            self._next_auth_probe = now + AUTH_RETRY_SECONDS
            log.error(
                "bem rejected the API key; nothing is sent until it is fixed, probing every "
                f"{AUTH_RETRY_SECONDS:.0f} s",
                error=exc.message,
            )
            await ctx.store.mark_submit_later(ids, not_before=now)
            ctx.nudges.supervisor.set()
        elif isinstance(exc, PermanentError):
            reason = f"bem rejected the call: {exc.message}"
            await ctx.store.mark_terminal(
                [Finished(g.id, "failed", None, reason) for g in groups], now=now
            )
            log.warning("call rejected", callReferenceIDs=refs, reason=reason)
            ctx.nudges.deliver.set()
        else:
            attempts = max(g.attempts for g in groups)
            retry_after = exc.retry_after if isinstance(exc, TransientError) else None
            delay = retry_delay(attempts, rng=ctx.rng, retry_after=retry_after)
            if isinstance(exc, TransientError) and exc.status_code is None:
                ctx.health.unreachable(now, exc.message)
                ctx.nudges.supervisor.set()
            log.warning(
                "submit failed; will retry", callReferenceIDs=refs, error=exc.message, delay=delay
            )
            await ctx.store.mark_submit_later(ids, not_before=now + delay)

    def _recheck_seconds(self) -> float:
        return min(UNKNOWN_RECHECK_SECONDS, self._ctx.config.api.visibility_window / 2)

    async def resolve_unknown(self) -> None:
        """Adopt calls that were created after all; resend those that surely were not."""
        ctx = self._ctx
        now = ctx.clock.wall()
        groups = await ctx.store.due_unknown(now=now, limit=LIST_REFERENCES_PER_REQUEST)
        if not groups:
            return
        try:
            found = await self._find_by_reference([g.call_reference_id for g in groups])
        except ApiError as exc:
            log.warning("cannot list calls to resolve unknown outcomes", error=exc.message)
            if isinstance(exc, AuthError):
                ctx.health.auth_error = exc.message
            elif isinstance(exc, TransientError) and exc.status_code is None:
                ctx.health.unreachable(now, exc.message)
            ctx.nudges.supervisor.set()
            await ctx.store.mark_unknown(
                [g.id for g in groups], not_before=now + self._recheck_seconds()
            )
            return
        window = ctx.config.api.visibility_window
        for group in groups:
            call = found.get(group.call_reference_id)
            decision = unknown_outcome_resolution(
                now=now,
                sent_at=group.sent_at or now,
                visibility_window=window,
                found=call is not None,
            )
            if call is not None:
                log.info(
                    "adopted call created by an earlier attempt",
                    callID=call.call_id,
                    callReferenceID=group.call_reference_id,
                )
                await self._submitted(group, call.call_id, call.status, call)
            elif decision == "wait":
                await ctx.store.mark_unknown([group.id], not_before=now + self._recheck_seconds())
            else:
                log.info(
                    "call was never created; sending again", callReferenceID=group.call_reference_id
                )
                await ctx.store.mark_submit_later([group.id], not_before=now)
        ctx.nudges.submit.set()

    async def _find_by_reference(self, references: Sequence[str]) -> dict[str, Call]:
        found: dict[str, Call] = {}
        faults.point("submit.before_list")
        async for call in self._ctx.client.iter_calls(
            reference_ids=list(references), sort_order="asc"
        ):
            # the oldest call with a reference wins, should a duplicate ever exist
            if call.call_reference_id and call.call_reference_id not in found:
                found[call.call_reference_id] = call
        faults.point("submit.after_list")
        return found


def _uploads(inbox: Path, group: GroupRow, files: list[FileRow]) -> list[UploadFile]:
    return [
        UploadFile(
            path=inbox / file.rel,
            input_type=file.input_type or "",
            item_reference_id=file.item_reference_id if group.batch else None,
        )
        for file in files
    ]


__all__ = ["Submitter"]
