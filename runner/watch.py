"""The watcher: which files in the inbox are ready to be taken.

Scanning is plain ``os.scandir`` that never follows a symlink and never opens anything that is
not a regular file. A file is taken once its size and mtime have not changed for
``settle_seconds``; a file whose mtime is already that old is taken on first sight, so a drain
of a quiet folder does not wait. File-system events (watchfiles) only say *where* to look
sooner; a periodic full rescan is the safety net.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import anyio
import structlog
import watchfiles
from watchfiles._rust_notify import WatchfilesRustInternalError

from runner.context import MIN_WAIT, Context
from runner.deliver import LEFT_IN_INBOX, outbox_paths
from runner.route import INPUT_TYPES, Route, input_type_for, is_ignored, route_file
from runner.store.base import FileRow, GroupRow, KnownFile, NewFile
from runner.submit import Sendable

log = structlog.get_logger("runner.watch")

HASH_CHUNK = 1 << 20
TAKE_PAGE = 1000
"""Settled files examined and stored per transaction."""


@dataclass(frozen=True)
class Entry:
    """A regular file seen in the inbox."""

    rel: str
    size: int
    mtime_ns: int


@dataclass
class ScanReport:
    entries: list[Entry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(rel, why) for symlinks and non-regular files: never taken, reported once."""


def scan_inbox(inbox: Path, under: str = "") -> ScanReport:
    """Every candidate file below ``inbox/under``; symlinks and special files are skipped."""
    report = ScanReport()
    start = inbox / under if under else inbox
    _walk(inbox, start, report)
    return report


def _walk(inbox: Path, directory: Path, report: ScanReport) -> None:
    try:
        iterator = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        report.skipped.append((_rel(inbox, Path(directory)), f"cannot list: {exc.strerror}"))
        return
    with iterator:
        for item in iterator:
            rel = _rel(inbox, Path(item.path))
            if is_ignored(PurePosixPath(rel)):
                continue
            try:
                if item.is_symlink():
                    report.skipped.append((rel, "symlink (never followed)"))
                elif item.is_dir(follow_symlinks=False):
                    _walk(inbox, Path(item.path), report)
                elif item.is_file(follow_symlinks=False):
                    st = item.stat(follow_symlinks=False)
                    report.entries.append(Entry(rel, st.st_size, st.st_mtime_ns))
                else:
                    report.skipped.append((rel, "not a regular file"))
            except FileNotFoundError:
                continue


def _rel(inbox: Path, path: Path) -> str:
    return path.relative_to(inbox).as_posix()


@dataclass
class Settler:
    """Remembers what each unsettled file looked like and since when."""

    settle_seconds: float
    _pending: dict[str, tuple[int, int, float]] = field(default_factory=dict)

    def observe(self, entries: Iterable[Entry], *, now: float, complete: bool) -> list[Entry]:
        """Feed one scan; return the entries that have settled.

        ``complete`` says the scan covered the whole inbox, so pending files it did not see
        have vanished and are forgotten.
        """
        settled: list[Entry] = []
        seen: set[str] = set()
        for entry in entries:
            seen.add(entry.rel)
            if self._is_settled(entry, now):
                settled.append(entry)
        if complete:
            for rel in list(self._pending):
                if rel not in seen:
                    del self._pending[rel]
        return settled

    def _is_settled(self, entry: Entry, now: float) -> bool:
        age = now - entry.mtime_ns / 1e9
        previous = self._pending.get(entry.rel)
        if previous is None or previous[:2] != (entry.size, entry.mtime_ns):
            if age >= self.settle_seconds:
                self._pending.pop(entry.rel, None)
                return True
            self._pending[entry.rel] = (entry.size, entry.mtime_ns, now)
            return False
        if now - previous[2] >= self.settle_seconds or age >= self.settle_seconds:
            del self._pending[entry.rel]
            return True
        return False

    def forget(self, rel: str) -> None:
        self._pending.pop(rel, None)

    @property
    def pending(self) -> Mapping[str, tuple[int, int, float]]:
        return self._pending

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(since for _, _, since in self._pending.values()) + self.settle_seconds

    def has_pending_under(self, folder: str) -> bool:
        prefix = folder.rstrip("/") + "/"
        return any(rel.startswith(prefix) for rel in self._pending)


def is_new(entry: Entry, known: Mapping[str, KnownFile], *, keep: bool) -> bool:
    """Whether a settled file is new work.

    A file with an unfinished row is never taken twice. A finished file that is still in the
    inbox is new when inputs are archived or deleted (it was dropped again), and only when its
    size or mtime changed when inputs are kept (so unchanged files are never hashed again) or
    when it was left in the inbox because the archive could never take it.
    """
    previous = known.get(entry.rel)
    if previous is None or previous.state == "retried":
        return True
    if previous.state not in ("done", LEFT_IN_INBOX):
        return False
    if not keep and previous.state == "done":
        return True
    # kept, or left in the inbox because it could not be archived: new only once it changes
    return (previous.size, previous.mtime_ns) != (entry.size, entry.mtime_ns)


def examine(
    inbox: Path, entry: Entry, *, routes: Sequence[Route], max_file_bytes: int
) -> NewFile | None:
    """Route, check and hash one settled file; ``None`` if it vanished meanwhile."""
    rel = PurePosixPath(entry.rel)
    destination = route_file(rel, routes)
    input_type = input_type_for(rel)
    reason = _rejection(rel, entry, destination is not None, input_type, routes, max_file_bytes)
    sha256: str | None = None
    if reason is None:
        try:
            sha256 = hash_file(inbox / entry.rel)
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = f"cannot read the file: {exc.strerror or exc}"
    return NewFile(
        rel=entry.rel,
        size=entry.size,
        mtime_ns=entry.mtime_ns,
        sha256=sha256,
        input_type=input_type,
        destination=destination,
        reason=reason,
    )


def _rejection(
    rel: PurePosixPath,
    entry: Entry,
    routed: bool,
    input_type: str | None,
    routes: Sequence[Route],
    max_file_bytes: int,
) -> str | None:
    if not routed:
        if routes:
            return "no [[route]] matches this file"
        return "no workflow for this file: put it in inbox/<workflow>/"
    if input_type is None:
        suffix = rel.suffix or "(none)"
        return f"unsupported file type {suffix!r}: bem accepts " + ", ".join(_supported())
    if entry.size == 0:
        return "empty file: nothing to send"
    if entry.size > max_file_bytes:
        return f"file too large: {entry.size} bytes > inbox.max_file_bytes = {max_file_bytes}"
    return None


def _supported() -> Iterator[str]:
    return iter(sorted(f".{ext}" for ext in INPUT_TYPES))


def hash_file(path: Path) -> str:
    """sha256 of a regular file, opened without following symlinks or blocking on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        digest = hashlib.sha256()
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The watch stage

EventSource = Callable[[Path, anyio.Event], AsyncIterator[set[str]]]
"""Yields sets of changed paths below the inbox until the event is set."""


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

    async def confirm_unchanged(self, groups: list[GroupRow]) -> Sendable:
        """Before a POST: drop files that vanished or changed since they were queued (a changed
        one is taken anew), and groups left empty. The groups worth sending, with their files."""
        store = self._ctx.store
        files_by_group = await store.files_of_groups([g.id for g in groups])
        sendable = []
        for group in groups:
            keep = [f for f in files_by_group[group.id] if await self._unchanged(group, f)]
            if keep:
                sendable.append((group, keep))
            else:
                await store.drop_empty_group(group.id)
        return sendable

    async def _unchanged(self, group: GroupRow, file: FileRow) -> bool:
        ctx = self._ctx
        try:
            st = await anyio.Path(ctx.config.paths.inbox / file.rel).lstat()
        except OSError as exc:
            await ctx.store.reject_queued_file(
                file, f"the file vanished from the inbox before it was sent ({exc.strerror})"
            )
            log.warning("file vanished", file=file.rel, callReferenceID=group.call_reference_id)
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
        keep = ctx.config.inbox.on_done == "keep"
        known = await ctx.store.known_files()
        # a finished file counts only while inputs are kept (see is_new)
        self._known.update((rel, k) for rel, k in known.items() if keep or k.state != "done")
        async with anyio.create_task_group() as tg:
            if self._events is not None and not ctx.draining:
                tg.start_soon(self._follow_events, name="watch-events")
            await self._loop()
            tg.cancel_scope.cancel()

    async def _follow_events(self) -> None:
        assert self._events is not None
        inbox = self._ctx.config.paths.inbox
        async for paths in self._events(inbox, self._ctx.stopping):
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
        self._untaken = Counter(folder for entry in fresh for folder in _folders(entry.rel))
        try:
            for start in range(0, len(fresh), TAKE_PAGE):
                if ctx.stopping.is_set():
                    break  # the rest is taken on the next start
                page = fresh[start : start + TAKE_PAGE]
                taken += await self._take_page(page)
                self._untaken.subtract(folder for entry in page for folder in _folders(entry.rel))
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


def scan_paths(inbox: Path, rels: Iterable[str]) -> ScanReport:
    """Look only at the given paths (files or folders) below the inbox."""
    report = ScanReport()
    for rel in sorted(rels):
        if not rel or rel == "." or is_ignored(PurePosixPath(rel)):
            continue
        path = inbox / rel
        try:
            st = path.lstat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISDIR(st.st_mode):
            sub = scan_inbox(inbox, rel)
            report.entries.extend(sub.entries)
            report.skipped.extend(sub.skipped)
        elif stat.S_ISREG(st.st_mode):
            report.entries.append(Entry(rel, st.st_size, st.st_mtime_ns))
        elif stat.S_ISLNK(st.st_mode):
            report.skipped.append((rel, "symlink (never followed)"))
        else:
            report.skipped.append((rel, "not a regular file"))
    # a new folder and a file inside it may both be named: each file once
    report.entries = list({entry.rel: entry for entry in report.entries}.values())
    return report


def _folders(rel: str) -> list[str]:
    """The folders a relative path lies in, outermost first: ``a/b/c.txt`` → ``a``, ``a/b``."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
