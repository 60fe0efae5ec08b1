"""What the pipeline needs from a store, and the rows it hands back.

SQLite (:mod:`runner.store.sqlite`) is the embedded default. The interface speaks in rows and
state transitions, not SQL, so a PostgreSQL store shared by several runners can be added beside it.

A call is one bem call. Its life::

    open ──close──▶ ready ──▶ sending ──▶ polling ──▶ terminal ──▶ done
                      ▲          │  ▲                    ▲
                      │          ▼  │ (found by listing) │ (rejected by bem, timed out)
                      └──────  unknown ─────────────────-┘

With content dedupe (:mod:`runner.dedupe`) a ready single-file call may instead go to
``waiting`` (for another file of the same content; woken back to ``ready``) or straight to
``terminal`` with ``reused_file_id`` set: no call, its document copied from that file's result.

A file's life: ``queued`` (in a call) or ``rejected`` (never sent) → ``delivered`` (its outbox
document is written) → ``done`` (archived, deleted or kept). ``retried`` rows are history.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol, TypeVar

import msgspec

from runner.names import from_raw, raw
from runner.route import Destination

DEFAULT_LEASE_SECONDS = 30.0
"""``store.lease_seconds``: a runner silent this long loses its claims to the others."""
CALL_REFERENCE_PREFIX = "bemr-"

CallState = Literal[
    "collecting", "ready", "waiting", "sending", "unknown", "polling", "terminal", "done"
]
FileState = Literal["queued", "rejected", "delivered", "done", "retried"]
BatchLimits = Mapping[str, tuple[int, int]]
"""``window`` batch key → (max files, max bytes); a file that would overflow starts a new call."""


def this_runner_id(configured: str = "") -> str:
    """This process's runner id: ``store.runner_id``, else ``hostname-pid``."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"


def new_call_reference_id() -> str:
    """The ``callReferenceID`` a call is born with: unique, and recognisably this runner's."""
    return f"{CALL_REFERENCE_PREFIX}{uuid.uuid4().hex}"


def new_call_params(workflow: str, mode: str, key: str, state: str, now: float) -> dict[str, Any]:
    """The parameters of every store's ``insert_call``: a call born with its reference."""
    return {
        "call_reference_id": new_call_reference_id(),
        "workflow": workflow,
        "mode": mode,
        "batch_key": raw(key),
        "state": state,
        "now": now,
    }


def webhook_event_params(event: WebhookEvent, now: float) -> dict[str, Any]:
    """The parameters of every store's ``insert_webhook_event``."""
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "call_id": event.call_id,
        "reference_id": event.reference_id,
        "now": now,
    }


def terminal_params(finished: Sequence[Finished], now: float) -> list[dict[str, Any]]:
    """The parameters of every store's ``mark_terminal``, one per call that ended."""
    return [
        {
            "id": f.call_row_id,
            "status": f.status,
            "result_json": f.result_json,
            "error_reason": f.error_reason,
            "now": now,
        }
        for f in finished
    ]


def next_poll_params(next_polls: Sequence[NextPoll]) -> list[dict[str, Any]]:
    """The parameters of every store's ``reschedule_poll``."""
    return [
        {
            "id": n.call_row_id,
            "not_before": n.not_before,
            "status": n.status,
            "seen_event_at": n.seen_event_at,
        }
        for n in next_polls
    ]


def new_file_params(new: NewFile, call_row_id: int | None, now: float) -> dict[str, Any]:
    """The parameters of every store's ``insert_file``: queued in its call, or rejected."""
    destination = new.destination
    return {
        "rel": raw(new.rel),
        "size": new.size,
        "mtime_ns": new.mtime_ns,
        "sha256": new.sha256,
        "input_type": new.input_type,
        "workflow": destination.workflow if destination else None,
        "item_reference_id": destination.item_reference_id if destination else None,
        "call_row_id": call_row_id,
        "state": "queued" if call_row_id is not None else "rejected",
        "reason": new.reason,
        "seen_at": now,
    }


class CallRow(msgspec.Struct, frozen=True):
    id: int
    call_reference_id: str
    workflow: str
    mode: str
    batch_key: str
    state: str
    opened_at: float
    last_added_at: float
    file_count: int
    byte_count: int
    not_before: float
    attempts: int
    sent_at: float | None
    submitted_at: float | None
    call_id: str | None
    status: str | None
    result_json: str | None
    error_reason: str | None
    finished_at: float | None
    event_at: float | None = None
    """When the latest webhook event for this call was recorded (None: none yet)."""
    reused_file_id: int | None = None
    """Content dedupe: the file whose completed result this call reuses (no bem call was made)."""

    @property
    def batch(self) -> bool:
        return self.mode != "file"


class FileRow(msgspec.Struct, frozen=True):
    id: int
    rel: str
    size: int
    mtime_ns: int
    sha256: str | None
    input_type: str | None
    workflow: str | None
    item_reference_id: str | None
    call_row_id: int | None
    state: str
    outcome: str | None
    reason: str | None
    seen_at: float
    delivered_at: float | None
    done_at: float | None


class NewFile(msgspec.Struct, frozen=True):
    """A settled file as the watcher hands it over: routed, or rejected with a reason."""

    rel: str
    size: int
    mtime_ns: int
    sha256: str | None
    input_type: str | None
    destination: Destination | None
    reason: str | None = None


LEFT_IN_INBOX = "left"
"""A :class:`KnownFile` state of the watcher's: finished, but could not be archived or deleted."""


class KnownFile(msgspec.Struct, frozen=True):
    size: int
    mtime_ns: int
    state: str


class Finished(msgspec.Struct, frozen=True):
    """A call that reached its end: bem's final status, the call as JSON, or why it failed."""

    call_row_id: int
    status: str
    result_json: str | None
    error_reason: str | None


class NextPoll(msgspec.Struct, frozen=True):
    call_row_id: int
    not_before: float
    status: str | None
    seen_event_at: float | None = None
    """The call's ``event_at`` as the poller read it (0.0: none). An event recorded since then
    keeps its earlier confirmation time; None: ``not_before`` is taken as it is."""


class WebhookEvent(msgspec.Struct, frozen=True):
    """A verified webhook event, as much of it as the runner keeps."""

    event_id: str
    event_type: str
    call_id: str | None
    reference_id: str | None


class EventRecorded(msgspec.Struct, frozen=True):
    """What recording one event did."""

    duplicate: bool
    """Its eventID was recorded before: nothing changed."""
    call_row_id: int | None
    """The call whose bem call it marked for confirmation; None: none (yet, or no longer)."""
    submitted_at: float | None
    """When that call was submitted, to learn how long calls take to produce events."""


class Delivery(msgspec.Struct, frozen=True):
    """A file whose outbox document is written."""

    file_id: int
    outcome: str  # "result" | "error"
    reason: str | None


class Counts(msgspec.Struct, frozen=True):
    files: dict[str, int]
    calls: dict[str, int]
    """Calls by state (calls that reused a result are no bem calls and not counted here)."""
    open_calls: int
    reused: int = 0
    """Files whose document was copied from an earlier completed result (content dedupe)."""


class Settled(msgspec.Struct, frozen=True):
    """What :meth:`Store.settle_duplicates` did with the calls it was given."""

    reused: list[int]
    """Calls ended without a bem call: their documents come from an earlier result."""
    waiting: list[int]
    """Calls waiting for another file of the same content."""


CallAsDelivered = tuple[CallRow, list[FileRow]]
"""A finished call and the files its documents were made for (see ``reuse_sources``)."""


def calls_as_delivered(
    sources: Sequence[FileRow], calls: Sequence[CallRow], call_files: Sequence[FileRow]
) -> dict[int, CallAsDelivered]:
    """Each source file's call and that call's files, from the rows a store read for them."""
    by_id = {g.id: g for g in calls}
    files: dict[int, list[FileRow]] = {gid: [] for gid in by_id}
    for file in call_files:
        assert file.call_row_id is not None
        files[file.call_row_id].append(file)
    return {
        f.id: (by_id[f.call_row_id], files[f.call_row_id])
        for f in sources
        if f.call_row_id is not None and f.call_row_id in by_id
    }


class RunnerRow(msgspec.Struct, frozen=True):
    """A runner sharing the store: who it is, when it last said it was alive, what it holds."""

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    calls_held: int


class Tokens(msgspec.Struct, frozen=True):
    """What one take from the shared rate budget gave: tokens, and how long until the next."""

    granted: int
    wait_seconds: float
    """0 when every token asked for was granted; else until the next one (or the pause's end)."""


class Store(Protocol):
    async def recover(self) -> None: ...
    async def known_files(self) -> dict[str, KnownFile]: ...
    async def add_files(
        self, files: list[NewFile], *, now: float, batch_limits: BatchLimits
    ) -> None: ...
    async def collecting_calls(self) -> list[CallRow]: ...
    async def close_batch(self, call_row_id: int) -> None: ...
    async def ready_calls(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def call(self, call_row_id: int) -> CallRow: ...
    async def files_of_calls(self, call_row_ids: Sequence[int]) -> dict[int, list[FileRow]]: ...
    async def supersede_file(self, file: FileRow) -> None: ...
    async def reject_queued_file(self, file: FileRow, reason: str) -> None: ...
    async def drop_empty_call(self, call_row_id: int) -> None: ...
    async def mark_sending(self, call_row_ids: list[int], *, now: float) -> None: ...
    async def confirm_sending(self, call_row_ids: Sequence[int], *, now: float) -> None:
        """Just before their POST goes out: this runner still holds these ``sending`` calls
        (else :class:`ClaimLostError`, and the POST must not go out), sent ``now``. Between
        ``mark_sending`` and the POST a runner may wait for the rate limit, or freeze, past its
        lease; by then another runner may have taken the call over and resolved it."""
        ...

    async def mark_submitted(
        self, call_row_id: int, *, call_id: str, status: str | None, now: float, next_poll: float
    ) -> None: ...
    async def mark_submit_later(self, call_row_ids: list[int], *, not_before: float) -> None: ...
    async def mark_unknown(self, call_row_ids: list[int], *, not_before: float) -> None: ...
    async def mark_terminal(self, finished: Sequence[Finished], *, now: float) -> None: ...
    async def record_polls(
        self, finished: Sequence[Finished], next_polls: Sequence[NextPoll], *, now: float
    ) -> None: ...
    async def due_polls(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def reschedule_polls(self, next_polls: Sequence[NextPoll]) -> None: ...
    async def due_unknown(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def next_poll_due(self) -> float | None: ...
    async def next_submit_due(self) -> float | None: ...
    async def terminal_calls(self, *, limit: int) -> list[CallRow]: ...
    async def rejected_files(self, *, limit: int) -> list[FileRow]: ...
    async def delivered_files(self, *, limit: int) -> list[FileRow]: ...
    async def mark_delivered(
        self, deliveries: Sequence[Delivery], *, finished_calls: Sequence[int], now: float
    ) -> None: ...
    async def mark_done(self, file_ids: Sequence[int], *, now: float) -> None: ...
    async def counts(self) -> Counts: ...
    async def open_call_count(self) -> int: ...
    async def unfinished_work(self) -> int: ...
    async def recent_errors(self, *, limit: int) -> list[tuple[str, str | None, float | None]]: ...
    async def failed_files(self) -> list[FileRow]: ...
    async def mark_retried(self, file_ids: list[int]) -> None: ...
    async def integrity_check(self) -> str: ...
    # -- content dedupe (SQLite schema 4, PostgreSQL schema 5) --
    async def settle_duplicates(self, call_row_ids: Sequence[int], *, now: float) -> Settled:
        """Decide, in one transaction, which of these ready single-file calls reuse an earlier
        completed result (ended ``terminal``, no call) or wait for a file of the same content
        (``waiting``), by :func:`runner.dedupe.decide`; the rest stay ready to be sent. A
        waiting call is woken (``ready``) when a file of its content is delivered or
        superseded, and by :meth:`recover`."""
        ...

    async def reuse_sources(self, file_ids: Sequence[int]) -> dict[int, CallAsDelivered]:
        """Per source file (a ``reused_file_id``): its call and the files that call's documents
        were made for, to make its document again exactly."""
        ...

    # -- webhooks (schema 3) --
    async def record_webhook_event(
        self, event: WebhookEvent, *, now: float, confirm_at: float
    ) -> EventRecorded: ...
    async def claim_webhook_events(
        self,
        call_row_id: int,
        *,
        call_id: str,
        call_reference_id: str,
        now: float,
        confirm_at: float,
    ) -> int: ...
    async def expire_webhook_events(
        self, *, received_before: float, purge_before: float
    ) -> int: ...
    async def webhook_event_counts(self) -> dict[str, int]: ...
    async def close(self) -> None: ...

    # -- several runners on one store ------------------------------------------------------
    # A claim gives one runner a call for one stage; every write to a call checks that the
    # writer still holds it (or that nobody does) and raises ClaimLostError otherwise, and
    # every write that moves a call on gives its claim up. A store one process owns (SQLite)
    # holds every claim: each ``claim_*`` is its list method, and it has one runner.
    async def claim_ready(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def claim_due_unknown(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def claim_due_polls(self, *, now: float, limit: int) -> list[CallRow]: ...
    async def claim_terminal(self, *, limit: int) -> list[CallRow]: ...
    async def release(self, call_row_ids: Sequence[int]) -> None: ...
    async def join(self) -> None:
        """Be one of the store's runners again (after :meth:`heartbeat` found this one declared
        dead): a fresh lease, no claims."""

    async def heartbeat(self) -> None:
        """Renew this runner's lease and its claims' (every ``lease_seconds / 3``);
        :class:`~runner.errors.ClaimLostError` when the others declared this runner dead."""

    async def expire_runners(self) -> list[str]:
        """Runners silent past their lease: gone, their claims free, their ``sending`` unknown."""

    async def runners(self) -> list[RunnerRow]: ...

    # One rate budget for all runners: ``rate`` per second, ``burst`` at most, taken a few
    # tokens at a time; a 429 pauses everyone and halves the rate they share. A store that one
    # process owns grants everything: that process's own limiter is the only budget.
    async def take_tokens(self, want: int, *, rate: float, burst: float) -> Tokens: ...
    async def pause_sending(self, seconds: float) -> None: ...

    def wake_ups(self) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """Listening from entry on: the stages ("submit", "poll", "deliver") to which another
        runner's committed writes gave work. Lost wake-ups only delay: every stage also looks
        on its own interval. One process alone is never woken (it nudges itself)."""
        ...


NAME_COLUMNS = ("rel", "batch_key")
"""Columns that hold a file-system name: its exact bytes in the database (see names.py)."""
RowT = TypeVar("RowT", "CallRow", "FileRow")


def rows_as(cls: type[RowT], rows: Iterable[Any]) -> list[RowT]:
    """Rows read from a store (each indexed by column name) as ``cls``, names given back as
    the runner's ``str``."""
    columns = cls.__struct_fields__
    named = [key for key in columns if key in NAME_COLUMNS]
    built = []
    for row in rows:
        values = {key: row[key] for key in columns}
        for key in named:
            if isinstance(values[key], bytes):
                values[key] = from_raw(values[key])
        built.append(cls(**values))
    return built
