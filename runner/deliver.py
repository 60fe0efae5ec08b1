"""The deliverer: one outbox document per input file, then the input is archived, deleted or kept.

A result goes to ``outbox/<path>.json``, an error to ``outbox/<path>.error.json`` — or, when the
file system cannot hold that name, to the file's alternative name (:mod:`runner.outbox`).
Writing one removes every other document of the same file, so a file always has exactly one.
Every write follows the maildir rule (temporary file, fsync, rename, fsync of the directory)
and is idempotent, so a crash at any point is mended by delivering again.

An outbox write that may succeed later (disk full, read-only, permissions) is retried; one that
never can ends elsewhere, once: under the alternative name, or, when no name at all can hold
the document, as a logged error (the file counts as failed). Archiving works the same way: an
input that can never be archived is left where it is and logged once.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import anyio
import structlog

from runner import faults, names
from runner.context import Context
from runner.outbox import (
    ERROR_SUFFIX,
    FILE_MODE,
    KINDS,
    RESULT_SUFFIX,
    SUFFIXES,
    Folders,
    Kind,
    Limits,
    Place,
    claims_natural,
    document_places,
    fits,
    fsync_directory,
    is_permanent,
    natural_place,
    open_folder,
    open_root,
    remove_places,
    replace_via_temporary,
    shown_place,
    write_atomic,
    write_atomic_at,
)
from runner.store.base import Delivery, FileRow, GroupRow

log = structlog.get_logger("runner.deliver")

RETRY_SECONDS = 5.0
BATCH = 200
LEFT_IN_INBOX = "left"
"""The watcher's state for a finished input that could not be archived or deleted."""

__all__ = [
    "BATCH",
    "ERROR_SUFFIX",
    "RESULT_SUFFIX",
    "Deliverer",
    "Document",
    "LeftInPlace",
    "Unwritable",
    "Written",
    "documents_for_group",
    "finish_input",
    "finish_inputs",
    "fsync_directory",
    "outbox_paths",
    "rejection_document",
    "write_atomic",
    "write_documents",
]

Event = dict[str, Any]


@dataclass(frozen=True)
class Document:
    file: FileRow
    outcome: Kind
    body: dict[str, Any]
    reason: str | None


def documents_for_group(group: GroupRow, files: Sequence[FileRow]) -> list[Document]:
    """Split a finished call into one document per file (see :func:`assign_events`).

    An error of a batch that belongs to no one file is bem's word on the whole call: it goes
    into every file's document, which makes each of them an error.
    """
    call: dict[str, Any] = json.loads(group.result_json) if group.result_json else {}
    outputs: list[Any] = call.get("outputs") or []
    errors: list[Any] = call.get("errors") or []
    if not group.batch:
        return [_document(group, call, file, outputs, errors, 0) for file in files]
    references = [file.item_reference_id for file in files]
    my_outputs, unmatched_outputs = assign_events(outputs, references)
    my_errors, unmatched_errors = assign_events(errors, references)
    return [
        _document(
            group, call, file, mine, [*their_errors, *unmatched_errors], len(unmatched_outputs)
        )
        for file, mine, their_errors in zip(files, my_outputs, my_errors, strict=True)
    ]


def assign_events(
    events: Sequence[Any], references: Sequence[str | None]
) -> tuple[list[list[Event]], list[Any]]:
    """Each batch file's events (by ``referenceID``, else ``itemOffset``), and the unmatched.

    A ``referenceID`` that several files share is settled by ``itemOffset``; a ``referenceID``
    no file was sent with belongs to no file, whatever its offset.
    """
    holders: dict[str, list[int]] = {}
    for index, reference in enumerate(references):
        if reference is not None:
            holders.setdefault(reference, []).append(index)
    mine: list[list[Event]] = [[] for _ in references]
    unmatched: list[Any] = []
    for event in events:
        owner = _owner(event, holders, len(references))
        if owner is None:
            unmatched.append(event)
        else:
            mine[owner].append(event)
    return mine, unmatched


def _owner(event: Any, holders: dict[str, list[int]], count: int) -> int | None:
    if not isinstance(event, dict):
        return None
    reference = event.get("referenceID")
    offset = event.get("itemOffset")
    at = offset if type(offset) is int and 0 <= offset < count else None
    if reference in (None, ""):
        return at
    owners = holders.get(reference, []) if isinstance(reference, str) else []
    if len(owners) == 1:
        return owners[0]
    return at if at in owners else None


def _document(
    group: GroupRow,
    call: dict[str, Any],
    file: FileRow,
    outputs: list[Any],
    errors: list[Any],
    unmatched_outputs: int,
) -> Document:
    status = call.get("status") or group.status or "failed"
    reason = group.error_reason
    if reason is None and errors:
        reason = "; ".join(_message(e) for e in errors)
    if reason is None and not outputs:
        reason = (
            f"the call ended {status} with no output for this file"
            if status == "completed"
            else f"the call ended {status}"
        )
        if unmatched_outputs:
            reason += f" ({unmatched_outputs} outputs of the call matched no file)"
    body: dict[str, Any] = {
        **names.name_fields("file", file.rel),
        "workflow": _shown(group.workflow),
        "callID": group.call_id,
        "callReferenceID": group.call_reference_id,
        "itemReferenceID": file.item_reference_id if group.batch else None,
        "status": status,
        "inputType": file.input_type,
        "sha256": file.sha256,
        "sizeBytes": file.size,
        "createdAt": call.get("createdAt"),
        "finishedAt": call.get("finishedAt") or _iso(group.finished_at),
        "submittedAt": _iso(group.submitted_at),
    }
    if reason is None:
        body["outputs"] = outputs
        return Document(file, "result", body, None)
    body["reason"] = reason
    body["errors"] = errors
    body["outputs"] = outputs
    return Document(file, "error", body, reason)


def _message(event: Any) -> str:
    message = event.get("message") if isinstance(event, dict) else None
    return str(message or "bem reported an error")


def rejection_document(file: FileRow) -> Document:
    body = {
        **names.name_fields("file", file.rel),
        "workflow": _shown(file.workflow),
        "status": "rejected",
        "reason": file.reason or "rejected",
        "inputType": file.input_type,
        "sizeBytes": file.size,
        "seenAt": _iso(file.seen_at),
    }
    return Document(file, "error", body, file.reason)


def _shown(name: str | None) -> str | None:
    return None if name is None else names.shown(name)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def encode(body: dict[str, Any]) -> bytes:
    """The document as UTF-8 JSON, whatever strings it holds (bem's JSON may carry lone
    surrogates, written then as ``\\u`` escapes)."""
    try:
        return json.dumps(body, indent=2, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(body, indent=2, ensure_ascii=True).encode() + b"\n"


# ---------------------------------------------------------------------------------------------
# Writing documents (blocking; run in a worker thread)


@dataclass(frozen=True)
class Written:
    """A document in place; ``instead_of`` is its natural name when that could not hold it."""

    path: Path
    folders: frozenset[tuple[str, ...]]
    """The folders it changed (its own, and those it removed another document from)."""
    instead_of: Path | None = None
    why: str | None = None


@dataclass(frozen=True)
class Unwritable:
    """No name can ever hold the document: the file ends in error, with this reason."""

    reason: str


WriteOutcome = Written | Unwritable | OSError
"""Per document: where it is, why it never can be, or the error to retry after."""


def outbox_paths(outbox: Path, rel: str) -> tuple[Path, Path]:
    """The natural result and error names of a file."""
    return outbox / (rel + RESULT_SUFFIX), outbox / (rel + ERROR_SUFFIX)


def write_documents(outbox: Path, documents: Sequence[Document]) -> list[WriteOutcome]:
    """Write many documents, then fsync each directory once; per document, its outcome.

    A document counts as written only once its directory is synced, so a failing directory
    fsync fails every document in that directory. An outbox root that cannot be opened fails
    every document with its (retried) error: it is never one file's fault.
    """
    try:
        folders = Folders(outbox)
    except OSError as exc:
        return [exc for _ in documents]
    with folders:
        outcomes: list[WriteOutcome] = []
        for document in documents:
            try:
                outcomes.append(_write_document(folders, document))
            except OSError as exc:
                outcomes.append(exc)
        faults.point("deliver.before_dir_fsync")
        failed = folders.sync()
        faults.point("deliver.after_dir_fsync")
    return [_unless_unsynced(o, failed) for o in outcomes]


def _unless_unsynced(outcome: WriteOutcome, failed: dict[tuple[str, ...], OSError]) -> WriteOutcome:
    if not isinstance(outcome, Written):
        return outcome
    return next((failed[f] for f in sorted(outcome.folders) if f in failed), outcome)


def _write_document(folders: Folders, document: Document) -> Written | Unwritable:
    rel, kind, root = document.file.rel, document.outcome, folders.root
    places = {k: document_places(root, rel, k, folders.limits) for k in KINDS}
    natural = natural_place(rel, kind)
    passed_over = [] if natural in places[kind] else [_why_not_natural(rel, kind)]
    data = encode(document.body)
    for place in places[kind]:
        try:
            fd = folders.fd(place.folders, create=True)
            write_atomic_at(fd, place.name, data, name_max=folders.limits.name_max)
        except OSError as exc:
            if not is_permanent(exc.errno):
                raise
            passed_over.append(f"{shown_place(root, place)}: {exc.strerror}")
            continue
        folders.changed(place.folders)
        others = [p for k in KINDS for p in places[k] if p != place]
        changed = frozenset({place.folders, *remove_places(folders, others)})
        if place == natural:
            return Written(place.path(root), changed)
        return Written(place.path(root), changed, natural.path(root), "; ".join(passed_over))
    return Unwritable("no outbox name can hold this file's document: " + "; ".join(passed_over))


def _why_not_natural(rel: str, kind: Kind) -> str:
    name = names.shown(rel) + SUFFIXES[kind]
    if not claims_natural(rel, kind):
        return f"{name} is the error document of another file"
    return f"{name}: too long for the file system"


# ---------------------------------------------------------------------------------------------
# Finishing inputs (blocking; run in a worker thread)


@dataclass(frozen=True)
class LeftInPlace:
    """An input that can never be archived: it stays in the inbox, and its file is finished."""

    reason: str


FinishOutcome = LeftInPlace | OSError | None
"""Per file: None when finished, why it stays in the inbox, or the error to retry after."""


class CannotFinish(Exception):
    """The input can never be archived (or deleted) as it is."""


def finish_inputs(
    inbox: Path, archive: Path, files: Sequence[FileRow], on_done: str
) -> list[FinishOutcome]:
    """Archive, delete or keep delivered inputs, then fsync the directories touched once each.

    Safe to repeat after a crash.
    """
    results: list[FinishOutcome] = []
    touched: list[set[Path]] = []
    for file in files:
        try:
            touched.append(
                finish_input(inbox, archive, file.rel, on_done, taken=(file.size, file.mtime_ns))
            )
            results.append(None)
        except CannotFinish as exc:
            touched.append(set())
            results.append(LeftInPlace(str(exc)))
        except OSError as exc:
            touched.append(set())
            results.append(exc)
    faults.point("archive.before_fsync")
    failed = _sync_directories(set().union(*touched))
    faults.point("archive.after_fsync")
    return [
        next((failed[d] for d in dirs if d in failed), result)
        for result, dirs in zip(results, touched, strict=True)
    ]


def _sync_directories(directories: set[Path]) -> dict[Path, OSError]:
    """fsync each directory; the ones that failed, with their error."""
    failed: dict[Path, OSError] = {}
    for directory in sorted(directories):
        try:
            fsync_directory(directory)
        except OSError as exc:
            failed[directory] = exc
    return failed


def finish_input(
    inbox: Path, archive: Path, rel: str, on_done: str, *, taken: tuple[int, int] | None = None
) -> set[Path]:
    """Archive, delete or keep one delivered input; return the directories to fsync.

    ``taken`` is the (size, mtime_ns) the file had when it was taken: a file that was replaced
    since is new work and is left in the inbox, never archived or deleted unseen. Raises
    :class:`CannotFinish` when the archive can never take it.
    """
    source = inbox / rel
    if on_done == "keep":
        return set()
    try:
        replaced = taken is not None and _replaced(source, taken)
        if on_done == "delete" and not replaced:
            return _delete(source)
    except OSError as exc:
        raise _cannot_finish_or(exc, names.shown(str(source))) from exc
    if replaced:
        log.info(
            "input replaced after it was taken; leaving the new one in the inbox",
            file=names.shown(rel),
        )
        return set()
    root_fd = open_root(archive, create=True)  # the archive itself: retried, never one file's
    try:
        return _archive(source, archive, root_fd, rel)
    finally:
        os.close(root_fd)


def _delete(source: Path) -> set[Path]:
    try:
        source.unlink()
    except FileNotFoundError:
        return set()
    return {source.parent}


def _archive(source: Path, archive: Path, root_fd: int, rel: str) -> set[Path]:
    *folders, name = rel.split("/")
    place = Place(tuple(folders), name)
    if not fits(archive, place, Limits.of(root_fd)):
        raise CannotFinish(f"{shown_place(archive, place)}: too long for the file system")
    if not os.path.lexists(source):
        return _finish_earlier_archive(archive, root_fd, place, source)
    try:
        fd = open_folder(root_fd, place.folders, create=True)
    except OSError as exc:
        raise _cannot_finish_or(exc, shown_place(archive, place)) from exc
    try:
        faults.point("archive.before_rename")
        try:
            _move(source, fd, name)
        except OSError as exc:
            raise _cannot_finish_or(exc, shown_place(archive, place)) from exc
        faults.point("archive.after_rename")
        _make_private(fd, name)
    finally:
        os.close(fd)
    return {place.path(archive).parent, source.parent}


def _finish_earlier_archive(archive: Path, root_fd: int, place: Place, source: Path) -> set[Path]:
    """The input is gone: if an earlier attempt archived it, finish what that one may not have."""
    try:
        fd = open_folder(root_fd, place.folders, create=False)
    except OSError as exc:
        if exc.errno == errno.ENOENT or is_permanent(exc.errno):
            return set()  # not archived here: removed by someone else
        raise
    try:
        if not _make_private(fd, place.name):
            return set()
    finally:
        os.close(fd)
    return {place.path(archive).parent, source.parent}  # the syncs may not have happened


def _cannot_finish_or(exc: OSError, where: str) -> Exception:
    """:class:`CannotFinish` for an error that can never succeed, else the error itself."""
    if is_permanent(exc.errno):
        return CannotFinish(f"{where}: {exc.strerror}")
    return exc


def _move(source: Path, folder_fd: int, name: str) -> None:
    try:
        os.replace(source, name, dst_dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # archive on another file system
            raise
        _copy_into(source, folder_fd, name)
        source.unlink()


def _copy_into(source: Path, folder_fd: int, name: str) -> None:
    st = source.stat()

    def fill(fh: BinaryIO) -> None:
        with source.open("rb") as src:
            shutil.copyfileobj(src, fh)
        fh.flush()
        os.utime(fh.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fh.fileno())

    replace_via_temporary(folder_fd, name, fill, name_max=Limits.of(folder_fd).name_max)


def _make_private(folder_fd: int, name: str) -> bool:
    """chmod an archived input (never through a link); whether it is there."""
    try:
        st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, FILE_MODE, dir_fd=folder_fd)
    return True


def _replaced(source: Path, taken: tuple[int, int]) -> bool:
    try:
        st = source.lstat()
    except FileNotFoundError:
        return False
    return (st.st_size, st.st_mtime_ns) != taken


# ---------------------------------------------------------------------------------------------
# The stage


class OnFinished(Protocol):
    """Told of each input that is finished (archived, deleted, kept, or left in the inbox)."""

    def __call__(self, file: FileRow, *, left_in_inbox: bool) -> None: ...


class Deliverer:
    def __init__(self, ctx: Context, *, on_finished: OnFinished) -> None:
        self._ctx = ctx
        self._on_finished = on_finished

    async def run(self) -> None:
        ctx = self._ctx
        while True:
            wait = await self.deliver_due()
            if ctx.stopping.is_set():
                return
            await ctx.nudges.deliver.wait(wait)

    async def deliver_due(self) -> float:
        """Deliver whatever is ready, a page at a time; return the idle wait."""
        ctx = self._ctx
        store = ctx.store
        # files delivered before a crash but not yet archived
        delivered = await store.delivered_files(limit=BATCH)
        rejected = await store.rejected_files(limit=BATCH)
        terminal = await store.terminal_groups(limit=BATCH)
        documents = [rejection_document(file) for file in rejected]
        files_by_group = await store.files_of_groups([g.id for g in terminal])
        for group in terminal:
            documents += [
                d
                for d in documents_for_group(group, files_by_group[group.id])
                if d.file.state == "queued"
            ]
        written = await self._write(documents)
        # a group whose files all have their documents now is done (the query checks)
        await store.mark_delivered(
            [Delivery(d.file.id, outcome, reason) for d, outcome, reason in written],
            finished_groups=[g.id for g in terminal],
            now=ctx.clock.wall(),
        )
        for _, outcome, _ in written:
            ctx.tally[outcome] += 1
        finished, left = await self._finish([*delivered, *(d.file for d, _, _ in written)])
        await store.mark_done([f.id for f in finished], now=ctx.clock.wall())
        for file in finished:
            self._on_finished(file, left_in_inbox=file.id in left)
        ctx.nudges.supervisor.set()
        if len(written) < len(documents) or len(finished) < len(delivered) + len(written):
            return RETRY_SECONDS
        if BATCH in (len(delivered), len(rejected), len(terminal)):
            return 0.0  # a full page: there may be more right away
        return ctx.config.inbox.rescan_seconds

    async def _write(self, documents: list[Document]) -> list[tuple[Document, Kind, str | None]]:
        """Write the documents; per one that is done with, its outcome and reason.

        Those that could not be written yet are logged and tried later; one that no name can
        hold is done with as an error.
        """
        if not documents:
            return []
        outbox = self._ctx.config.paths.outbox
        outcomes = await anyio.to_thread.run_sync(write_documents, outbox, documents)
        done: list[tuple[Document, Kind, str | None]] = []
        for document, outcome in zip(documents, outcomes, strict=True):
            file = names.shown(document.file.rel)
            if isinstance(outcome, OSError):
                log.error(
                    "cannot write to the outbox; will retry",
                    file=file,
                    error=names.shown(str(outcome)),
                )
            elif isinstance(outcome, Unwritable):
                log.error(
                    "no document can be written for this file; it fails",
                    file=file,
                    reason=outcome.reason,
                )
                done.append((document, "error", outcome.reason))
            else:
                self._log_delivered(document, outcome)
                done.append((document, document.outcome, document.reason))
        return done

    def _log_delivered(self, document: Document, written: Written) -> None:
        if written.instead_of is not None:
            log.warning(
                "document written under another name",
                file=names.shown(document.file.rel),
                natural=names.shown(str(written.instead_of)),
                outbox=names.shown(str(written.path)),
                why=written.why,
            )
        log.info(
            "file delivered",
            file=names.shown(document.file.rel),
            outcome=document.outcome,
            outbox=names.shown(str(written.path)),
            callID=document.body.get("callID"),
            callReferenceID=document.body.get("callReferenceID"),
            reason=document.reason,
        )

    async def _finish(self, files: list[FileRow]) -> tuple[list[FileRow], set[int]]:
        """Archive, delete or keep the inputs: the files finished, and those left in place.

        Those that failed for now are logged and tried later; one that can never be archived
        is left in the inbox, logged once, and finished.
        """
        if not files:
            return [], set()
        ctx = self._ctx
        paths = ctx.config.paths
        results = await anyio.to_thread.run_sync(
            finish_inputs, paths.inbox, paths.archive, files, ctx.config.inbox.on_done
        )
        finished: list[FileRow] = []
        left: set[int] = set()
        for file, result in zip(files, results, strict=True):
            if isinstance(result, OSError):
                log.error(
                    "cannot archive or delete the input; will retry",
                    file=names.shown(file.rel),
                    error=names.shown(str(result)),
                )
                continue
            if isinstance(result, LeftInPlace):
                log.error(
                    "the input can never be archived; it stays in the inbox",
                    file=names.shown(file.rel),
                    reason=result.reason,
                )
                left.add(file.id)
            finished.append(file)
        return finished, left
