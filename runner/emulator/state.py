"""Calls as the emulator remembers them, and how they progress with emulator time.

A call never changes after it is created: its status at any moment is computed from its
creation time and latency (pending until a third of the latency has passed, running until the
latency has passed, then completed or failed), so no background task moves calls along.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from runner.emulator.inputs import CallInput, ItemInput

CallStatus = Literal["pending", "running", "completed", "failed"]
CallType = Literal["workflow", "direct_function"]
CALL_STATUSES: tuple[CallStatus, ...] = ("pending", "running", "completed", "failed")
CALL_TYPES: tuple[str, ...] = ("workflow", "direct_function", "adhoc_function")

# Share of a call's latency spent pending before it starts running.
PENDING_SHARE = 1 / 3


class Target(msgspec.Struct, frozen=True):
    """What a call invokes: a workflow, or a single function called directly."""

    call_type: CallType
    name: str
    id: str

    @classmethod
    def workflow(cls, name: str) -> Target:
        return cls("workflow", name, derived_id("wf", name))

    @classmethod
    def function(cls, name: str, function_id: str | None = None) -> Target:
        return cls("direct_function", name, function_id or derived_id("fn", name))

    @property
    def function_name(self) -> str:
        """The function that produces the events: a workflow runs one transform step."""
        return f"{self.name}-transform" if self.call_type == "workflow" else self.name

    @property
    def function_id(self) -> str:
        return derived_id("fn", self.function_name) if self.call_type == "workflow" else self.id


class ItemFailure(msgspec.Struct, frozen=True):
    kind: str
    message: str


class ItemRecord(msgspec.Struct, frozen=True):
    offset: int
    reference_id: str
    item_reference_id: str | None
    input_type: str
    size: int
    sha256: str
    excerpt: str | None
    failure: ItemFailure | None
    event_id: str
    function_call_id: str


class CallRecord(msgspec.Struct, frozen=True):
    call_id: str
    seq: int
    target: Target
    call_reference_id: str | None
    metadata: dict[str, Any] | None
    batch: bool
    items: tuple[ItemRecord, ...]
    created_at: float  # emulator time
    created_wall: datetime  # UTC
    latency: float

    @property
    def started_at(self) -> float:
        return self.created_at + self.latency * PENDING_SHARE

    @property
    def finished_at(self) -> float:
        return self.created_at + self.latency

    @property
    def started_wall(self) -> datetime:
        return self.created_wall + timedelta(seconds=self.latency * PENDING_SHARE)

    @property
    def finished_wall(self) -> datetime:
        return self.created_wall + timedelta(seconds=self.latency)

    @property
    def all_items_failed(self) -> bool:
        return all(item.failure is not None for item in self.items)

    def status(self, now: float) -> CallStatus:
        if now < self.started_at:
            return "pending"
        if now < self.finished_at:
            return "running"
        return "failed" if self.all_items_failed else "completed"

    def item_status(self, item: ItemRecord, now: float) -> CallStatus:
        status = self.status(now)
        if status in ("pending", "running"):
            return status
        return "failed" if item.failure is not None else "completed"


def derived_id(prefix: str, *parts: str) -> str:
    """A stable identifier derived from names, so the same input always yields the same ID."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"{prefix}_{digest[:20]}"


def decide_failure(item: ItemInput, failure_rate: float, rng: random.Random) -> ItemFailure | None:
    if item.digest.contains_fail_marker:
        return ItemFailure(
            kind="emulator_trigger",
            message="transform failed: the content contains BEM-EMULATOR-FAIL",
        )
    if failure_rate > 0 and rng.random() < failure_rate:
        return ItemFailure(
            kind="emulator_random_failure",
            message="transform failed: injected failure (failure_rate)",
        )
    return None


def build_call(
    *,
    call_id: str,
    seq: int,
    target: Target,
    call_input: CallInput,
    failures: list[ItemFailure | None],
    created_at: float,
    created_wall: datetime,
    latency: float,
) -> CallRecord:
    items = tuple(
        ItemRecord(
            offset=offset,
            reference_id=_item_reference(call_input, item, offset),
            item_reference_id=item.item_reference_id,
            input_type=item.input_type,
            size=item.digest.size,
            sha256=item.digest.sha256,
            excerpt=item.digest.excerpt,
            failure=failure,
            event_id=derived_id("evt", call_id, str(offset)),
            function_call_id=derived_id("fc", call_id, str(offset)),
        )
        for offset, (item, failure) in enumerate(zip(call_input.items, failures, strict=True))
    )
    return CallRecord(
        call_id=call_id,
        seq=seq,
        target=target,
        call_reference_id=call_input.call_reference_id,
        metadata=call_input.metadata,
        batch=call_input.batch,
        items=items,
        created_at=created_at,
        created_wall=created_wall,
        latency=latency,
    )


def _item_reference(call_input: CallInput, item: ItemInput, offset: int) -> str:
    # Exactly what was sent, even an empty string; the offset only when nothing was.
    if call_input.batch:
        return item.item_reference_id if item.item_reference_id is not None else str(offset)
    return call_input.call_reference_id if call_input.call_reference_id is not None else "0"


class CallStore:
    """Every call created so far, by ID and in creation order."""

    def __init__(self) -> None:
        self._by_id: dict[str, CallRecord] = {}
        self._ordered: list[CallRecord] = []

    def __len__(self) -> int:
        return len(self._ordered)

    def __iter__(self) -> Iterator[CallRecord]:
        return iter(self._ordered)

    def add(self, record: CallRecord) -> None:
        self._by_id[record.call_id] = record
        self._ordered.append(record)

    def get(self, call_id: str) -> CallRecord | None:
        return self._by_id.get(call_id)

    def workflow_by_id(self, workflow_id: str) -> Target | None:
        for record in self._ordered:
            if record.target.call_type == "workflow" and record.target.id == workflow_id:
                return record.target
        return None
