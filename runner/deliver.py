"""The deliverer: one outbox document per input file, then the input is archived, deleted or kept.

A result goes to ``outbox/<path>.json``, an error to ``outbox/<path>.error.json``; writing one
removes the other, so a file always has exactly one. Every write follows the maildir rule
(temporary file, fsync, rename, fsync of the directory) and is idempotent, so a crash at any
point is mended by delivering again.
"""

from __future__ import annotations

import errno
import functools
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
from runner.store.base import FileRow, GroupRow, KnownFile

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


def write_document(outbox: Path, document: Document) -> Path:
    result_path, error_path = outbox_paths(outbox, document.file.rel)
    target, other = (
        (result_path, error_path) if document.outcome == "result" else (error_path, result_path)
    )
    data = json.dumps(document.body, indent=2, ensure_ascii=False, sort_keys=False).encode() + b"\n"
    write_atomic(target, data)
    _unlink(temporary_path(other))
    _unlink(other)
    return target


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename, fsync of the directory.

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
    faults.point("deliver.before_dir_fsync")
    fsync_directory(path.parent)
    faults.point("deliver.after_dir_fsync")


def temporary_path(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp"


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_directory(path.parent)


def finish_input(
    inbox: Path, archive: Path, rel: str, on_done: str, *, taken: tuple[int, int] | None = None
) -> None:
    """Archive, delete or keep a delivered input; safe to repeat after a crash.

    ``taken`` is the (size, mtime_ns) the file had when it was taken: a file that was replaced
    since is new work and is left in the inbox, never archived or deleted unseen.
    """
    source = inbox / rel
    if on_done == "keep":
        return
    if taken is not None and _replaced(source, taken):
        log.info("input replaced after it was taken; leaving the new one in the inbox", file=rel)
        return
    if on_done == "delete":
        _unlink(source)
        return
    target = archive / rel
    if not source.exists() and not source.is_symlink():
        if target.exists():
            os.chmod(target, FILE_MODE)  # the chmod after the rename may not have happened
        return  # already archived by an earlier attempt
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
    faults.point("archive.before_fsync")
    fsync_directory(target.parent)
    fsync_directory(source.parent)
    faults.point("archive.after_fsync")


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
        """Deliver whatever is ready; return the idle wait (short after an outbox failure)."""
        ctx = self._ctx
        healthy = True
        delivered = await ctx.store.delivered_files(limit=BATCH)
        for file in delivered:
            healthy &= await self._finish(file)
        rejected = await ctx.store.rejected_files(limit=BATCH)
        for file in rejected:
            healthy &= await self._deliver(rejection_document(file))
        terminal = await ctx.store.terminal_groups(limit=BATCH)
        for group in terminal:
            files = await ctx.store.group_files(group.id)
            pending = [f for f in files if f.state == "queued"]
            for document in documents_for_group(group, files):
                if document.file.state == "queued":
                    healthy &= await self._deliver(document)
            if healthy or not pending:
                await ctx.store.finish_group(group.id)
        ctx.nudges.supervisor.set()
        if not healthy:
            return RETRY_SECONDS
        if BATCH in (len(delivered), len(rejected), len(terminal)):
            return 0.0  # a full page: there may be more right away
        return ctx.config.inbox.rescan_seconds

    async def _deliver(self, document: Document) -> bool:
        ctx = self._ctx
        file = document.file
        try:
            path = await anyio.to_thread.run_sync(write_document, ctx.config.paths.outbox, document)
        except OSError as exc:
            log.error("cannot write to the outbox; will retry", file=file.rel, error=str(exc))
            return False
        await ctx.store.mark_delivered(
            file.id, outcome=document.outcome, reason=document.reason, now=ctx.clock.wall()
        )
        ctx.tally[document.outcome] += 1
        log.info(
            "file delivered",
            file=file.rel,
            outcome=document.outcome,
            outbox=str(path),
            callID=document.body.get("callID"),
            callReferenceID=document.body.get("callReferenceID"),
            reason=document.reason,
        )
        return await self._finish(file)

    async def _finish(self, file: FileRow) -> bool:
        ctx = self._ctx
        paths = ctx.config.paths
        try:
            await anyio.to_thread.run_sync(
                functools.partial(
                    finish_input,
                    paths.inbox,
                    paths.archive,
                    file.rel,
                    ctx.config.inbox.on_done,
                    taken=(file.size, file.mtime_ns),
                )
            )
        except OSError as exc:
            log.error(
                "cannot archive or delete the input; will retry", file=file.rel, error=str(exc)
            )
            return False
        await ctx.store.mark_done(file.id, now=ctx.clock.wall())
        ctx.known[file.rel] = KnownFile(file.size, file.mtime_ns, "done")
        return True
