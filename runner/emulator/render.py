"""JSON shapes of calls, events and traces, as the official SDK's models and the seeds define them.

Optional fields without a value are left out rather than sent as ``null``; ``finishedAt``,
``outputs`` and ``errors`` fill in once the call is terminal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from runner.emulator.state import CallRecord, CallStatus, ItemFailure, ItemRecord

JsonObject = dict[str, Any]

WORKFLOW_VERSION = 1
FUNCTION_VERSION = 1
FUNCTION_TYPE = "transform"
ACTIVITY_NAME = "Transform"


def timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` suffix, millisecond precision."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def v3_call(record: CallRecord, now: float, base_url: str) -> JsonObject:
    status = record.status(now)
    terminal = status in ("completed", "failed")
    return {
        **_call_head(record, status),
        "input": _input_info(record),
        "outputs": [output_event(record, item) for item in _succeeded(record)] if terminal else [],
        "errors": _error_events(record) if terminal else [],
        "url": f"{base_url}/v3/calls/{record.call_id}",
        "traceUrl": f"{base_url}/v3/calls/{record.call_id}/trace",
    }


def v2_call(record: CallRecord, now: float) -> JsonObject:
    return {
        **_call_head(record, record.status(now)),
        "functionCalls": [_v2_function_call(record, item, now) for item in record.items],
        "input": _input_info(record),
    }


def _call_head(record: CallRecord, status: CallStatus) -> JsonObject:
    head: JsonObject = {
        "callID": record.call_id,
        "callType": record.target.call_type,
        "status": status,
        "createdAt": timestamp(record.created_wall),
    }
    if status in ("completed", "failed"):
        head["finishedAt"] = timestamp(record.finished_wall)
    head |= _target_fields(record)
    if record.call_reference_id is not None:
        head["callReferenceID"] = record.call_reference_id
    return head


def trace(record: CallRecord, now: float) -> JsonObject:
    """The execution trace: one function call per item once running, events once terminal."""
    status = record.status(now)
    function_calls = [] if status == "pending" else [
        _trace_function_call(record, item, now) for item in record.items
    ]  # fmt: skip
    events: list[JsonObject] = []
    if status in ("completed", "failed"):
        events = [output_event(record, item) for item in _succeeded(record)]
        events += _error_events(record)
    return {"trace": {"functionCalls": function_calls, "events": events}}


def output_event(record: CallRecord, item: ItemRecord) -> JsonObject:
    return {
        **_event_base(record, item),
        "eventType": "transform",
        "itemOffset": item.offset,
        "itemCount": len(record.items),
        "inputType": item.input_type,
        "transformedContent": transformed_content(record, item),
        "avgConfidence": 1.0,
    }


def error_event(record: CallRecord, item: ItemRecord, failure: ItemFailure) -> JsonObject:
    return {
        **_event_base(record, item),
        "eventType": "error",
        "message": failure.message,
        "kind": failure.kind,
    }


def transformed_content(record: CallRecord, item: ItemRecord) -> JsonObject:
    """What the emulated transform "extracts": facts about the file, identical for equal files."""
    content: JsonObject = {
        "referenceID": item.reference_id,
        "inputType": item.input_type,
        "byteSize": item.size,
        "sha256": item.sha256,
    }
    if item.excerpt is not None:
        content["excerpt"] = item.excerpt
    if record.metadata is not None:
        content["_metadata"] = record.metadata
    return content


def _event_base(record: CallRecord, item: ItemRecord) -> JsonObject:
    target = record.target
    base: JsonObject = {
        "eventID": item.event_id,
        "referenceID": item.reference_id,
        "functionID": target.function_id,
        "functionName": target.function_name,
        "functionVersionNum": FUNCTION_VERSION,
        "functionCallID": item.function_call_id,
        "functionCallTryNumber": 1,
        "callID": record.call_id,
        "createdAt": timestamp(record.finished_wall),
        "metadata": {"durationFunctionToEventSeconds": record.latency},
    }
    if target.call_type == "workflow":
        base |= {
            "workflowID": target.id,
            "workflowName": target.name,
            "workflowVersionNum": WORKFLOW_VERSION,
        }
    return base


def _target_fields(record: CallRecord) -> JsonObject:
    target = record.target
    if target.call_type == "workflow":
        return {
            "workflowID": target.id,
            "workflowName": target.name,
            "workflowVersionNum": WORKFLOW_VERSION,
        }
    return {
        "functionID": target.id,
        "functionName": target.name,
        "functionType": FUNCTION_TYPE,
        "functionVersionNum": FUNCTION_VERSION,
    }


def _input_info(record: CallRecord) -> JsonObject:
    if not record.batch:
        return {"singleFile": {"inputType": record.items[0].input_type}}
    return {"batchFiles": {"inputs": [_file_info(item) for item in record.items]}}


def _file_info(item: ItemRecord) -> JsonObject:
    info: JsonObject = {"inputType": item.input_type}
    if item.item_reference_id is not None:
        info["itemReferenceID"] = item.item_reference_id
    return info


def _v2_function_call(record: CallRecord, item: ItemRecord, now: float) -> JsonObject:
    status = record.item_status(item, now)
    function_call: JsonObject = {
        "functionCallID": item.function_call_id,
        "functionID": record.target.function_id,
        "functionName": record.target.function_name,
        "type": FUNCTION_TYPE,
        "referenceID": item.reference_id,
        "status": status,
        "functionVersionNum": FUNCTION_VERSION,
        "activity": [{"displayName": ACTIVITY_NAME, "status": status}],
        "inputType": item.input_type,
        "inputs": [_file_info(item)],
    }
    if record.target.call_type == "workflow":
        function_call["workflowCallID"] = record.call_id
    return function_call


def _trace_function_call(record: CallRecord, item: ItemRecord, now: float) -> JsonObject:
    status = record.item_status(item, now)
    function_call: JsonObject = {
        "functionCallID": item.function_call_id,
        "functionID": record.target.function_id,
        "functionName": record.target.function_name,
        "functionVersionNum": FUNCTION_VERSION,
        "referenceID": item.reference_id,
        "type": FUNCTION_TYPE,
        "status": status,
        "startedAt": timestamp(record.started_wall),
        "activity": [{"displayName": ACTIVITY_NAME, "status": status}],
        "inputType": item.input_type,
        "inputs": [_file_info(item)],
    }
    if record.target.call_type == "workflow":
        function_call["workflowCallID"] = record.call_id
    if status in ("completed", "failed"):
        function_call["finishedAt"] = timestamp(record.finished_wall)
    return function_call


def _succeeded(record: CallRecord) -> list[ItemRecord]:
    return [item for item in record.items if item.failure is None]


def _error_events(record: CallRecord) -> list[JsonObject]:
    return [
        error_event(record, item, item.failure) for item in record.items if item.failure is not None
    ]
