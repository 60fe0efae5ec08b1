"""The deliverer: one outbox document per input file, then the input is archived, deleted or kept.

A result goes to ``outbox/<path>.json``, an error to ``outbox/<path>.error.json``; writing one
removes the other, so a file always has exactly one. Every write follows the maildir rule
(temporary file, fsync, rename, fsync of the directory) and is idempotent, so a crash at any
point is mended by delivering again.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from runner import faults
from runner.context import Context
from runner.store.base import Delivery, FileRow, GroupRow, KnownFile

log = structlog.get_logger("runner.deliver")

RESULT_SUFFIX = ".json"
ERROR_SUFFIX = ".error.json"
FILE_MODE = 0o600
RETRY_SECONDS = 5.0
BATCH = 200


@dataclass(frozen=True)
class Document:
    file: FileRow
    outcome: str  # "result" | "error"
    body: dict[str, Any]
    reason: str | None


def documents_for_group(group: GroupRow, files: Sequence[FileRow]) -> list[Document]:
    """Split a finished call into one document per file: by ``referenceID``, else ``itemOffset``."""
    call: dict[str, Any] = json.loads(group.result_json) if group.result_json else {}
    outputs: list[dict[str, Any]] = call.get("outputs") or []
    errors: list[dict[str, Any]] = call.get("errors") or []
    documents = []
    for index, file in enumerate(files):
        if group.batch:
            mine = _events_for(outputs, file.item_reference_id, index)
            my_errors = _events_for(errors, file.item_reference_id, index)
        else:
            mine, my_errors = outputs, errors
        documents.append(_document(group, call, file, mine, my_errors))
    return documents


def _events_for(
    events: list[dict[str, Any]], reference: str | None, index: int
) -> list[dict[str, Any]]:
    by_reference = [
        e for e in events if reference is not None and e.get("referenceID") == reference
    ]
    if by_reference:
        return by_reference
    return [
        e for e in events if e.get("referenceID") in (None, "") and e.get("itemOffset") == index
    ]


def _document(
    group: GroupRow,
    call: dict[str, Any],
    file: FileRow,
    outputs: list[dict[str, Any]],
    errors: list[dict[str, Any]],
) -> Document:
    status = call.get("status") or group.status or "failed"
    reason = group.error_reason
    if reason is None and errors:
        reason = "; ".join(str(e.get("message") or "bem reported an error") for e in errors)
    if reason is None and not outputs:
        reason = (
            f"the call ended {status} with no output for this file"
            if status == "completed"
            else f"the call ended {status}"
        )
    body: dict[str, Any] = {
        "file": file.rel,
        "workflow": group.workflow,
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


def rejection_document(file: FileRow) -> Document:
    body = {
        "file": file.rel,
        "workflow": file.workflow,
        "status": "rejected",
        "reason": file.reason or "rejected",
        "inputType": file.input_type,
        "sizeBytes": file.size,
        "seenAt": _iso(file.seen_at),
    }
    return Document(file, "error", body, file.reason)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# File operations (blocking; run in a worker thread)


def outbox_paths(outbox: Path, rel: str) -> tuple[Path, Path]:
    return outbox / (rel + RESULT_SUFFIX), outbox / (rel + ERROR_SUFFIX)


def write_document(outbox: Path, document: Document, *, sync_directory: bool = True) -> Path:
    result_path, error_path = outbox_paths(outbox, document.file.rel)
    target, other = (
        (result_path, error_path) if document.outcome == "result" else (error_path, result_path)
    )
    data = json.dumps(document.body, indent=2, ensure_ascii=False, sort_keys=False).encode() + b"\n"
    write_atomic(target, data, sync_directory=sync_directory)
    _unlink(temporary_path(other))
    _unlink(other)
    return target


def write_documents(outbox: Path, documents: Sequence[Document]) -> list[Path | OSError]:
    """Write many documents, then fsync each directory once; per document, its path or error.

    A document counts as written only once its directory is synced, so a failing directory
    fsync fails every document in that directory.
    """
    results: list[Path | OSError] = []
    for document in documents:
        try:
            results.append(write_document(outbox, document, sync_directory=False))
        except OSError as exc:
            results.append(exc)
    faults.point("deliver.before_dir_fsync")
    failed = _sync_directories({r.parent for r in results if isinstance(r, Path)})
    faults.point("deliver.after_dir_fsync")
    return [failed.get(r.parent, r) if isinstance(r, Path) else r for r in results]


def write_atomic(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Temporary file, fsync, rename, fsync of the directory (unless the caller does it).

    The temporary's name depends only on the target, so a process killed before the rename
    leaves a temporary that the next delivery of the same document overwrites and renames.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = temporary_path(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            faults.point("deliver.before_fsync")
            os.fsync(fh.fileno())
            faults.point("deliver.after_fsync")
        faults.point("deliver.before_rename")
        os.replace(temporary, path)
    except BaseException:
        _unlink(temporary)
        raise
    faults.point("deliver.after_rename")
    if sync_directory:
        fsync_directory(path.parent)


def temporary_path(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp"


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directories(directories: set[Path]) -> dict[Path, OSError]:
    """fsync each directory; the ones that failed, with their error."""
    failed: dict[Path, OSError] = {}
    for directory in sorted(directories):
        try:
            fsync_directory(directory)
        except OSError as exc:
            failed[directory] = exc
    return failed


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_directory(path.parent)


def finish_inputs(
    inbox: Path, archive: Path, files: Sequence[FileRow], on_done: str
) -> list[OSError | None]:
    """Archive, delete or keep delivered inputs, then fsync the directories touched once each.

    Per file, None when it is finished or the error that stopped it. Safe to repeat after a crash.
    """
    results: list[OSError | None] = []
    touched: list[set[Path]] = []
    for file in files:
        try:
            touched.append(
                finish_input(inbox, archive, file.rel, on_done, taken=(file.size, file.mtime_ns))
            )
            results.append(None)
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


def finish_input(
    inbox: Path, archive: Path, rel: str, on_done: str, *, taken: tuple[int, int] | None = None
) -> set[Path]:
    """Archive, delete or keep one delivered input; return the directories to fsync.

    ``taken`` is the (size, mtime_ns) the file had when it was taken: a file that was replaced
    since is new work and is left in the inbox, never archived or deleted unseen.
    """
    source = inbox / rel
    if on_done == "keep":
        return set()
    if taken is not None and _replaced(source, taken):
        log.info("input replaced after it was taken; leaving the new one in the inbox", file=rel)
        return set()
    if on_done == "delete":
        try:
            source.unlink()
        except FileNotFoundError:
            return set()
        return {source.parent}
    target = archive / rel
    if not source.exists() and not source.is_symlink():
        if target.exists():
            os.chmod(target, FILE_MODE)  # the chmod after the rename may not have happened
            return {target.parent, source.parent}  # the syncs after it may not have either
        return set()  # already archived by an earlier attempt
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    faults.point("archive.before_rename")
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # archive on another file system
            raise
        shutil.copy2(source, target)
        with target.open("rb") as fh:
            os.fsync(fh.fileno())
        source.unlink()
    faults.point("archive.after_rename")
    os.chmod(target, FILE_MODE)
    return {target.parent, source.parent}


def _replaced(source: Path, taken: tuple[int, int]) -> bool:
    try:
        st = source.lstat()
    except FileNotFoundError:
        return False
    return (st.st_size, st.st_mtime_ns) != taken


# ---------------------------------------------------------------------------------------------
# The stage


class Deliverer:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

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
            [Delivery(d.file.id, d.outcome, d.reason) for d, _ in written],
            finished_groups=[g.id for g in terminal],
            now=ctx.clock.wall(),
        )
        for document, path in written:
            ctx.tally[document.outcome] += 1
            self._log_delivered(document, path)
        finished = await self._finish([*delivered, *(d.file for d, _ in written)])
        await store.mark_done([f.id for f in finished], now=ctx.clock.wall())
        keep = ctx.config.inbox.on_done == "keep"
        for file in finished:
            if keep:  # so that a kept file is not taken again while it stays unchanged
                ctx.known[file.rel] = KnownFile(file.size, file.mtime_ns, "done")
            else:  # gone from the inbox: whatever comes under its name is new work
                ctx.known.pop(file.rel, None)
        ctx.nudges.supervisor.set()
        if len(written) < len(documents) or len(finished) < len(delivered) + len(written):
            return RETRY_SECONDS
        if BATCH in (len(delivered), len(rejected), len(terminal)):
            return 0.0  # a full page: there may be more right away
        return ctx.config.inbox.rescan_seconds

    async def _write(self, documents: list[Document]) -> list[tuple[Document, Path]]:
        """Write the documents; those that could not be written are logged and tried later."""
        if not documents:
            return []
        outbox = self._ctx.config.paths.outbox
        results = await anyio.to_thread.run_sync(write_documents, outbox, documents)
        written = []
        for document, result in zip(documents, results, strict=True):
            if isinstance(result, OSError):
                log.error(
                    "cannot write to the outbox; will retry",
                    file=document.file.rel,
                    error=str(result),
                )
            else:
                written.append((document, result))
        return written

    def _log_delivered(self, document: Document, path: Path) -> None:
        log.info(
            "file delivered",
            file=document.file.rel,
            outcome=document.outcome,
            outbox=str(path),
            callID=document.body.get("callID"),
            callReferenceID=document.body.get("callReferenceID"),
            reason=document.reason,
        )

    async def _finish(self, files: list[FileRow]) -> list[FileRow]:
        """Archive, delete or keep the inputs; those that failed are logged and tried later."""
        if not files:
            return []
        ctx = self._ctx
        paths = ctx.config.paths
        results = await anyio.to_thread.run_sync(
            finish_inputs, paths.inbox, paths.archive, files, ctx.config.inbox.on_done
        )
        finished = []
        for file, error in zip(files, results, strict=True):
            if error is None:
                finished.append(file)
            else:
                log.error(
                    "cannot archive or delete the input; will retry",
                    file=file.rel,
                    error=str(error),
                )
        return finished
