"""The outbox documents of a finished call: one per file, its outputs or its error.

A batch call's events are split among its files by ``referenceID`` (else ``itemOffset``); an
error that names no file reaches every file of the call. Documents are valid UTF-8 JSON for
any file name (:mod:`runner.names`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from runner import names
from runner.outbox import (
    Kind,
)
from runner.store.base import CallRow, FileRow

Event = dict[str, Any]


class Document(msgspec.Struct, frozen=True):
    file: FileRow
    outcome: Kind
    body: dict[str, Any]
    reason: str | None


def documents_for_call(group: CallRow, files: Sequence[FileRow]) -> list[Document]:
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
    group: CallRow,
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


FILE_FIELDS = ("file", "fileBase64", "itemReferenceID", "inputType", "sha256", "sizeBytes")
"""The fields of a result that belong to the file, not to the call (see :func:`reused_document`)."""


def reused_document(
    call: CallRow, file: FileRow, source: CallRow, source_files: Sequence[FileRow]
) -> Document:
    """The document of a file that reused another file's completed result (content dedupe).

    It is that file's document, made again from its call exactly as it was delivered, with this
    file's own fields and ``reusedFrom``: the call's ID. A source that does not make a result
    (it cannot: only results are reused) gives an error document naming it, never its outputs.
    """
    original = next(
        (d for d in documents_for_call(source, source_files) if d.file.id == call.reused_file_id),
        None,
    )
    if original is None or original.outcome != "result":
        reason = f"the result to reuse (call {source.call_id}) could not be made again"
        body = {**names.name_fields("file", file.rel), "status": "failed", "reason": reason}
        return Document(file, "error", {**body, "reusedFrom": source.call_id}, reason)
    body = {k: v for k, v in original.body.items() if k not in ("file", "fileBase64")}
    mine: dict[str, Any] = {
        **names.name_fields("file", file.rel),
        **body,
        "itemReferenceID": file.item_reference_id if call.batch else None,
        "inputType": file.input_type,
        "sha256": file.sha256,
        "sizeBytes": file.size,
        "reusedFrom": source.call_id,
    }
    return Document(file, "result", mine, None)


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


_PYTHON_WRITES_FLOATS_OTHERWISE = re.compile(rb"[0-9][eE]|\.0000")
"""Where msgspec's float text may differ from ``json.dumps``': an exponent (``1e-7`` against
``1e-07``), or a small number msgspec writes out in full (``0.00001`` against ``1e-05``). It
also matches some strings; those documents merely take the slower way."""


def encode(body: dict[str, Any]) -> bytes:
    """The document as indented UTF-8 JSON, whatever strings it holds (bem's JSON may carry
    lone surrogates, written then as ``\\u`` escapes).

    The bytes are exactly ``json.dumps(body, indent=2, ensure_ascii=False)``'s, written by
    msgspec where that gives the same bytes (six times faster), by ``json`` where it may not.
    """
    try:
        compact = msgspec.json.encode(body)
    except UnicodeEncodeError:
        return json.dumps(body, indent=2, ensure_ascii=True).encode() + b"\n"
    if _PYTHON_WRITES_FLOATS_OTHERWISE.search(compact):
        return json.dumps(body, indent=2, ensure_ascii=False).encode() + b"\n"
    return msgspec.json.format(compact, indent=2) + b"\n"
