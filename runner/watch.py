"""The watch stage: takes settled files from the inbox into the store, grouped.

File-system events (watchfiles) only say *where* to look sooner; a periodic full rescan is the
safety net. Reading the inbox itself is :mod:`runner.scan`. The watcher owns its cache of the
files it knows, and checks queued files again just before they are sent.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import structlog
import watchfiles
from watchfiles._rust_notify import WatchfilesRustInternalError

from runner.context import MIN_WAIT, Context
from runner.deliver import outbox_paths
from runner.scan import (
    Entry,
    Settler,
    examine,
    folders_of,
    is_new,
    scan_inbox,
    scan_paths,
)
from runner.store.base import LEFT_IN_INBOX, CallRow, FileRow, KnownFile, NewFile
from runner.submit import Sendable

log = structlog.get_logger("runner.watch")

TAKE_PAGE = 1000
"""Settled files examined and stored per transaction."""
# ---------------------------------------------------------------------------------------------
# The watch stage

EventSource = Callable[[Path, anyio.Event], AsyncIterator[set[str]]]
"""Yields sets of changed paths below the inbox until the event is set. The watcher sets it
whenever it stops following, cancelled too: a source may wait where no cancellation reaches."""


EVENTS_LOST_PAUSE = 1.0
"""After watchfiles fails on a name it cannot decode, watch again after this many seconds."""


async def watchfiles_events(inbox: Path, stop: anyio.Event) -> AsyncIterator[set[str]]:
    """File events from watchfiles; when they are lost, the inbox itself is reported changed.

    watchfiles cannot decode a name that is not UTF-8 and stops with an error; the events of
    that moment are lost, so the inbox is reported (a full rescan, which reads names as bytes)
    and watching starts again.
    """
    while not stop.is_set():
        lost = False
        try:
            async for changes in watchfiles.awatch(
                inbox,
                stop_event=stop,
                recursive=True,
                debounce=200,
                step=50,
                # A wait for changes is a call in a worker thread that no cancellation ends: it
                # returns on changes, on ``stop`` (looked at every ``step``) or after this many
                # ms. The watcher sets ``stop`` when it stops following, so this is only how
                # often an idle wait starts over (watchfiles' default on Linux, written out).
                rust_timeout=5_000,
                ignore_permission_denied=True,
            ):
                yield {path for _, path in changes}
            return
        except* WatchfilesRustInternalError as group:
            lost = True
            log.warning(
                "file events lost; rescanning the inbox",
                error=str(group.exceptions[0])[:200],
            )
        if lost:
            yield {str(inbox)}
            with anyio.move_on_after(EVENTS_LOST_PAUSE):
                await stop.wait()


class Watcher:
    """Scans the inbox, settles files and hands new ones to the store, grouped."""

    def __init__(self, ctx: Context, *, events: EventSource | None) -> None:
        self._ctx = ctx
        self._events = events
        self._settler = Settler(ctx.config.inbox.settle_seconds)
        self._dirty: set[str] = set()
        self._rescan_now = False
        self._untaken: Counter[str] = Counter()
        self._reported: set[str] = set()
        self._known: dict[str, KnownFile] = {}
        """The store's latest row per inbox path, so rescans never re-hash. The watcher's own:
        other stages tell it what they did (:meth:`file_finished`, :meth:`confirm_unchanged`)."""

    def file_finished(self, file: FileRow, *, left_in_inbox: bool) -> None:
        """Told by the deliverer: this input was archived, deleted, kept or left in place."""
        if left_in_inbox:  # still in the inbox, but finished: taken again only once it changes
            self._known[file.rel] = KnownFile(file.size, file.mtime_ns, LEFT_IN_INBOX)
        elif self._ctx.config.inbox.on_done == "keep":  # not taken again while unchanged
            self._known[file.rel] = KnownFile(file.size, file.mtime_ns, "done")
        else:  # gone from the inbox: whatever comes under its name is new work
            self._known.pop(file.rel, None)

    async def confirm_unchanged(self, calls: list[CallRow]) -> Sendable:
        """Before a POST: drop files that vanished or changed since they were queued (a changed
        one is taken anew), and calls left empty. The calls worth sending, with their files."""
        store = self._ctx.store
        files_by_call = await store.files_of_calls([c.id for c in calls])
        inbox = self._ctx.config.paths.inbox
        rels = [f.rel for call in calls for f in files_by_call[call.id]]
        # the whole page in one trip to a worker thread, not one trip per file
        found = await anyio.to_thread.run_sync(_lstat_each, inbox, rels)
        sendable = []
        for call in calls:
            files = files_by_call[call.id]
            keep = [f for f in files if await self._unchanged(call, f, found[f.rel])]
            if keep:
                sendable.append((call, keep))
            else:
                await store.drop_empty_call(call.id)
        return sendable

    async def _unchanged(self, call: CallRow, file: FileRow, st: os.stat_result | OSError) -> bool:
        ctx = self._ctx
        if isinstance(st, OSError):
            exc = st
            await ctx.store.reject_queued_file(
                file, f"the file vanished from the inbox before it was sent ({exc.strerror})"
            )
            log.warning("file vanished", file=file.rel, callReferenceID=call.call_reference_id)
            ctx.nudges.deliver.set()
            return False
        if (st.st_size, st.st_mtime_ns) != (file.size, file.mtime_ns):
            await ctx.store.supersede_file(file)
            self._known.pop(file.rel, None)
            ctx.nudges.watch.set()
            log.info("file changed after it was queued; taking it again", file=file.rel)
            return False
        return True

    def has_pending_under(self, folder: str) -> bool:
        """Whether files under ``folder`` are still settling or not yet taken."""
        return self._untaken[folder.rstrip("/")] > 0 or self._settler.has_pending_under(folder)

    async def run(self) -> None:
        ctx = self._ctx
        ctx.config.paths.inbox.mkdir(parents=True, exist_ok=True)
        await self._load_known()
        async with anyio.create_task_group() as tg:
            if self._events is not None and not ctx.draining:
                tg.start_soon(self._follow_events, name="watch-events")
            await self._loop()
            tg.cancel_scope.cancel()

    async def _load_known(self) -> None:
        """What the store knows of the inbox's paths (also what other runners took or did)."""
        keep = self._ctx.config.inbox.on_done == "keep"
        known = await self._ctx.store.known_files()
        left = {rel for rel, k in self._known.items() if k.state == LEFT_IN_INBOX}
        # a finished file counts only while inputs are kept (see is_new); one left in the inbox
        # stays so until it changes
        self._known = {
            rel: self._known[rel] if rel in left and k.state == "done" else k
            for rel, k in known.items()
            if keep or k.state != "done" or rel in left
        }

    async def _follow_events(self) -> None:
        assert self._events is not None
        inbox = self._ctx.config.paths.inbox
        # The source ends at once only when ``stop`` is set: watchfiles waits for changes in a
        # worker thread that a cancellation cannot interrupt (it would hold the runner's stop
        # up to 5 s), but that looks at ``stop`` every 50 ms. So ``stop`` is set as soon as
        # following ends, however it ends: the runner stopping, or the watcher failing on a
        # store that cannot be reached (it is then started again, with a new event).
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_when_cancelled, stop, name="watch-events-stop")
            async for paths in self._events(inbox, stop):
                self._note_changed(inbox, paths)
            tg.cancel_scope.cancel()

    def _note_changed(self, inbox: Path, paths: set[str]) -> None:
        for path in paths:
            try:
                rel = Path(path).relative_to(inbox).as_posix()
            except ValueError:
                continue
            if rel == ".":
                self._rescan_now = True
            else:
                self._dirty.add(rel)
        self._ctx.nudges.watch.set()

    async def _loop(self) -> None:
        ctx = self._ctx
        rescan_every = ctx.config.inbox.rescan_seconds
        next_full = ctx.clock.now()
        while not ctx.stopping.is_set():
            full = ctx.draining or self._rescan_now or ctx.clock.now() >= next_full
            if full:
                self._rescan_now = False
                next_full = ctx.clock.now() + rescan_every
            await self.take(full=full)
            if ctx.draining and not self._settler.pending:
                ctx.inbox_taken.set()
                ctx.nudges.supervisor.set()
                return
            timeout = next_full - ctx.clock.now()
            deadline = self._settler.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(deadline - ctx.clock.wall(), MIN_WAIT))
            await ctx.nudges.watch.wait(timeout)

    async def take(self, *, full: bool) -> int:
        """One pass: scan, settle, examine, store. Returns how many files were taken."""
        ctx = self._ctx
        inbox = ctx.config.paths.inbox
        if full:
            self._dirty.clear()
            if ctx.runner_id is not None:  # other runners take files and finish them too
                await self._load_known()
            report = await anyio.to_thread.run_sync(scan_inbox, inbox)
        else:
            targets = self._dirty | set(self._settler.pending)
            self._dirty = set()
            report = await anyio.to_thread.run_sync(scan_paths, inbox, targets)
        self._report_skipped(report.skipped)
        settled = self._settler.observe(report.entries, now=ctx.clock.wall(), complete=full)
        keep = ctx.config.inbox.on_done == "keep"
        fresh = [entry for entry in settled if is_new(entry, self._known, keep=keep)]
        taken = 0
        # A page at a time: a huge inbox starts flowing early and is never all in memory at
        # once. Folders with files still to come stay open meanwhile (has_pending_under).
        self._untaken = Counter(folder for entry in fresh for folder in folders_of(entry.rel))
        try:
            for start in range(0, len(fresh), TAKE_PAGE):
                if ctx.stopping.is_set():
                    break  # the rest is taken on the next start
                page = fresh[start : start + TAKE_PAGE]
                taken += await self._take_page(page)
                self._untaken.subtract(folder for entry in page for folder in folders_of(entry.rel))
        finally:
            self._untaken.clear()
        return taken

    async def _take_page(self, entries: list[Entry]) -> int:
        ctx = self._ctx
        new_files = await anyio.to_thread.run_sync(self._examine_all, entries)
        if ctx.config.inbox.on_done == "keep":
            new_files = await anyio.to_thread.run_sync(self._skip_delivered, new_files)
        await ctx.store.add_files(
            new_files, now=ctx.clock.wall(), batch_limits=self._batch_limits()
        )
        for new in new_files:
            state = "rejected" if new.reason else "queued"
            self._known[new.rel] = KnownFile(new.size, new.mtime_ns, state)
            if new.reason:
                log.warning("file rejected", file=new.rel, reason=new.reason)
            else:
                log.info(
                    "file queued",
                    file=new.rel,
                    workflow=new.destination and new.destination.workflow,
                )
        for nudge in (ctx.nudges.group, ctx.nudges.submit, ctx.nudges.deliver):
            nudge.set()
        return len(new_files)

    def _skip_delivered(self, new_files: list[NewFile]) -> list[NewFile]:
        """Kept inputs the store has no record of, whose document already records the same
        content, are not sent again (the state was deleted or replaced): warned, and skipped."""
        outbox = self._ctx.config.paths.outbox
        fresh = []
        for new in new_files:
            if new.rel not in self._known and _has_document_for(outbox, new):
                self._known[new.rel] = KnownFile(new.size, new.mtime_ns, "done")
                log.warning(
                    "input already has a document with the same content but the state has no "
                    "record of it (was the state deleted?); not sending it again",
                    file=new.rel,
                )
            else:
                fresh.append(new)
        return fresh

    def _examine_all(self, entries: list[Entry]) -> list[NewFile]:
        config = self._ctx.config
        examined = (
            examine(
                config.paths.inbox,
                entry,
                routes=config.routes,
                max_file_bytes=config.inbox.max_file_bytes,
            )
            for entry in entries
        )
        return [new for new in examined if new is not None]

    def _batch_limits(self) -> dict[str, tuple[int, int]]:
        return {
            f"window:{index}": (route.batch_max_files, route.batch_max_bytes)
            for index, route in enumerate(self._ctx.config.routes)
            if route.group == "window"
        }

    def _report_skipped(self, skipped: list[tuple[str, str]]) -> None:
        for rel, why in skipped:
            if rel not in self._reported:
                self._reported.add(rel)
                log.warning("file skipped", file=rel, reason=why)


async def _set_when_cancelled(event: anyio.Event) -> None:
    """Sets ``event`` when cancelled: when the task group it runs in ends, however it ends."""
    try:
        await anyio.sleep_forever()
    finally:
        event.set()


def _lstat_each(inbox: Path, rels: list[str]) -> dict[str, os.stat_result | OSError]:
    """Each file's lstat, or why it failed."""
    found: dict[str, os.stat_result | OSError] = {}
    for rel in rels:
        try:
            found[rel] = (inbox / rel).lstat()
        except OSError as exc:
            found[rel] = exc
    return found


def _has_document_for(outbox: Path, new: NewFile) -> bool:
    """Whether the outbox holds a document (result or error) recording this file's content."""
    if new.sha256 is None:
        return False
    for path in outbox_paths(outbox, new.rel):
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and document.get("sha256") == new.sha256:
            return True
    return False
