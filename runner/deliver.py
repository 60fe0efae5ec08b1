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

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import anyio
import msgspec
import structlog

from runner import faults, names
from runner.archive import LeftInPlace, finish_inputs
from runner.context import Context
from runner.documents import (
    Document,
    documents_for_call,
    encode,
    rejection_document,
    reused_document,
)
from runner.errors import ClaimLostError
from runner.file_ops import Folders, is_permanent, remove_places, write_atomic_at
from runner.outbox import (
    ERROR_SUFFIX,
    KINDS,
    RESULT_SUFFIX,
    SINGLE_OWNER_TOKEN,
    SUFFIXES,
    Kind,
    claims_natural,
    document_places,
    natural_place,
    runner_token,
    shown_place,
)
from runner.store.base import Delivery, FileRow

log = structlog.get_logger("runner.deliver")

RETRY_SECONDS = 5.0
CLAIM_LOST_RETRY_SECONDS = 0.1
"""After a delivery fenced off by another runner's: soon, the rest of the page is still to do."""
BATCH = 200

__all__ = [
    "BATCH",
    "ERROR_SUFFIX",
    "RESULT_SUFFIX",
    "Deliverer",
    "Unwritable",
    "Written",
    "outbox_paths",
    "write_documents",
]
# ---------------------------------------------------------------------------------------------
# Writing documents (blocking; run in a worker thread)


class Written(msgspec.Struct, frozen=True):
    """A document in place; ``instead_of`` is its natural name when that could not hold it."""

    path: Path
    folders: frozenset[tuple[str, ...]]
    """The folders it changed (its own, and those it removed another document from)."""
    instead_of: Path | None = None
    why: str | None = None


class Unwritable(msgspec.Struct, frozen=True):
    """No name can ever hold the document: the file ends in error, with this reason."""

    reason: str


WriteOutcome = Written | Unwritable | OSError
"""Per document: where it is, why it never can be, or the error to retry after."""


def outbox_paths(outbox: Path, rel: str) -> tuple[Path, Path]:
    """The natural result and error names of a file."""
    return outbox / (rel + RESULT_SUFFIX), outbox / (rel + ERROR_SUFFIX)


def write_documents(
    outbox: Path, documents: Sequence[Document], *, token: str = SINGLE_OWNER_TOKEN
) -> list[WriteOutcome]:
    """Write many documents, then fsync each directory once; per document, its outcome.

    A document counts as written only once its directory is synced, so a failing directory
    fsync fails every document in that directory. An outbox root that cannot be opened fails
    every document with its (retried) error: it is never one file's fault.
    """
    try:
        folders = Folders(outbox, token=token)
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
            write_atomic_at(
                fd, place.name, data, name_max=folders.limits.name_max, token=folders.token
            )
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
        terminal = await store.claim_terminal(limit=BATCH)
        documents = [rejection_document(file) for file in rejected]
        files_by_call = await store.files_of_calls([g.id for g in terminal])
        sources = await store.reuse_sources(
            [g.reused_file_id for g in terminal if g.reused_file_id is not None]
        )
        for call in terminal:
            files = files_by_call[call.id]
            if call.reused_file_id is not None:
                source, source_files = sources[call.reused_file_id]
                made = [reused_document(call, f, source, source_files) for f in files]
            else:
                made = documents_for_call(call, files)
            documents += [d for d in made if d.file.state == "queued"]
        written = await self._write(documents)
        try:
            # a call whose files all have their documents now is done (the query checks)
            await store.mark_delivered(
                [Delivery(d.file.id, outcome, reason) for d, outcome, reason in written],
                finished_calls=[g.id for g in terminal],
                now=ctx.clock.wall(),
            )
        except ClaimLostError as exc:
            # Another runner delivered some of these (the same bytes: a document depends only
            # on the rows). Nothing is recorded; what is still ours is delivered again.
            log.info(
                "claim lost; another runner has this work", action="deliver", reason=exc.message
            )
            await store.release([g.id for g in terminal])
            return CLAIM_LOST_RETRY_SECONDS
        for _, outcome, _ in written:
            ctx.tally[outcome] += 1
        if written and ctx.config.inbox.dedupe == "content":
            ctx.nudges.submit.set()  # files waiting for these contents decide again
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
        write = partial(write_documents, token=runner_token(self._ctx.runner_id))
        outcomes = await anyio.to_thread.run_sync(write, outbox, documents)
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
        finish = partial(finish_inputs, token=runner_token(ctx.runner_id))
        results = await anyio.to_thread.run_sync(
            finish, paths.inbox, paths.archive, files, ctx.config.inbox.on_done
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
