"""``GET /v3/calls``: query parameters, filters, sort order and cursor pagination.

Array parameters are one key with comma-separated values (``statuses=a,b``), as the official
SDK sends them; a repeated key (``statuses=a&statuses=b``) is a 400, so a client that speaks
another format fails here instead of against bem. ``limit`` is 1 to 100; more is a 400.
Cursors are call IDs; a page holds the calls strictly after ``startingAfter`` and/or strictly
before ``endingBefore`` in the requested order. With only ``endingBefore`` the page is the
``limit`` calls closest to the cursor, still in the requested order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec
from starlette.datastructures import QueryParams

from runner.emulator.errors import InvalidRequest
from runner.emulator.state import CALL_STATUSES, CALL_TYPES, CallRecord, CallStore

DEFAULT_LIMIT = 50
MAX_LIMIT = 100

ARRAY_PARAMS = {
    "callIDs": "call_ids",
    "referenceIDs": "reference_ids",
    "workflowIDs": "workflow_ids",
    "workflowNames": "workflow_names",
    "statuses": "statuses",
    "callTypes": "call_types",
    "functionIDs": "function_ids",
    "functionNames": "function_names",
}
_SCALAR_PARAMS = frozenset(
    {"referenceIDSubstring", "sortOrder", "limit", "startingAfter", "endingBefore"}
)


class ListQuery(msgspec.Struct, frozen=True):
    call_ids: frozenset[str] = frozenset()
    reference_ids: frozenset[str] = frozenset()
    reference_id_substring: str | None = None
    workflow_ids: frozenset[str] = frozenset()
    workflow_names: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    call_types: frozenset[str] = frozenset()
    function_ids: frozenset[str] = frozenset()
    function_names: frozenset[str] = frozenset()
    sort_order: Literal["asc", "desc"] = "asc"
    limit: int = DEFAULT_LIMIT
    starting_after: str | None = None
    ending_before: str | None = None

    def matches(self, record: CallRecord, now: float) -> bool:
        target = record.target
        is_workflow = target.call_type == "workflow"
        reference = record.call_reference_id or ""
        substring = self.reference_id_substring
        checks = (
            (self.call_ids, record.call_id),
            (self.reference_ids, record.call_reference_id),
            (self.workflow_ids, target.id if is_workflow else None),
            (self.workflow_names, target.name if is_workflow else None),
            (self.statuses, record.status(now)),
            (self.call_types, target.call_type),
            (self.function_ids, None if is_workflow else target.id),
            (self.function_names, None if is_workflow else target.name),
        )
        if any(wanted and value not in wanted for wanted, value in checks):
            return False
        return substring is None or substring.lower() in reference.lower()


def parse_list_query(params: QueryParams) -> ListQuery:
    unknown = sorted(set(params.keys()) - set(ARRAY_PARAMS) - _SCALAR_PARAMS)
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown)}")
    arrays = {field: _split(_scalar(params, key)) for key, field in ARRAY_PARAMS.items()}
    _check_choices("statuses", arrays["statuses"], CALL_STATUSES)
    _check_choices("callTypes", arrays["call_types"], CALL_TYPES)
    return ListQuery(
        call_ids=arrays["call_ids"],
        reference_ids=arrays["reference_ids"],
        reference_id_substring=_scalar(params, "referenceIDSubstring"),
        workflow_ids=arrays["workflow_ids"],
        workflow_names=arrays["workflow_names"],
        statuses=arrays["statuses"],
        call_types=arrays["call_types"],
        function_ids=arrays["function_ids"],
        function_names=arrays["function_names"],
        sort_order=_sort_order(_scalar(params, "sortOrder")),
        limit=_limit(_scalar(params, "limit")),
        starting_after=_scalar(params, "startingAfter"),
        ending_before=_scalar(params, "endingBefore"),
    )


def select_calls(
    store: CallStore, query: ListQuery, *, now: float, visibility_lag: float
) -> list[CallRecord]:
    """One page: visible calls matching every filter, ordered, cut by cursors and limit."""
    sign = 1 if query.sort_order == "asc" else -1
    after = _cursor_seq(store, query.starting_after, "startingAfter")
    before = _cursor_seq(store, query.ending_before, "endingBefore")

    def in_window(record: CallRecord) -> bool:
        rank = sign * record.seq
        if after is not None and rank <= sign * after:
            return False
        return before is None or rank < sign * before

    page = [
        record
        for record in sorted(store, key=lambda record: sign * record.seq)
        if now >= record.created_at + visibility_lag
        and in_window(record)
        and query.matches(record, now)
    ]
    if before is not None and after is None:
        return page[-query.limit :]
    return page[: query.limit]


def _cursor_seq(store: CallStore, call_id: str | None, name: str) -> int | None:
    if call_id is None:
        return None
    record = store.get(call_id)
    if record is None:
        raise InvalidRequest(f"{name}: no call with ID {call_id!r}")
    return record.seq


def _split(value: str | None) -> frozenset[str]:
    return frozenset(part for part in (value or "").split(",") if part)


def _scalar(params: QueryParams, key: str) -> str | None:
    values = params.getlist(key)
    if len(values) > 1:
        raise InvalidRequest(
            f"query parameter {key}: given more than once; send one {key} with "
            "comma-separated values"
        )
    return values[0] if values else None


def _check_choices(key: str, values: frozenset[str], allowed: Sequence[str]) -> None:
    bad = sorted(values - set(allowed))
    if bad:
        raise InvalidRequest(f"{key}: {', '.join(bad)} not among {', '.join(allowed)}")


def _sort_order(value: str | None) -> Literal["asc", "desc"]:
    if value is None or value == "asc":
        return "asc"
    if value == "desc":
        return "desc"
    raise InvalidRequest(f"sortOrder: {value!r} is neither asc nor desc")


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit():
        raise InvalidRequest(f"limit: {value!r} is not a whole number")
    limit = int(value)
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit: must be from 1 to {MAX_LIMIT}, not {limit}")
    return limit
