"""Typed shapes of the bem API, v3 and v2.

Responses are :mod:`msgspec` structs, read with each response type's ``from_json``. A field the
models do not know is skipped, and an event of a type they do not know reads as a plain
:class:`OutputEvent`, because bem adds fields and event types over time and the runner must keep
working when it does; a call read from bem still gives back every field it was sent with
(:meth:`Call.sent_json`). A list sent as ``null`` (``"outputs": null``) reads as an empty list.
Fields are snake_case here and named as bem spells them on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypeAlias, TypeVar

import msgspec

CallStatus = Literal["pending", "running", "completed", "failed"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed"})

UNREADABLE: tuple[type[Exception], ...] = (msgspec.DecodeError, RecursionError)
"""What ``from_json`` raises for a body it cannot read: not JSON, not the shape of the response
(:class:`msgspec.ValidationError`, a :class:`msgspec.DecodeError`), or nested too deep."""

_Item = TypeVar("_Item")

if TYPE_CHECKING:
    Items: TypeAlias = list[_Item]
else:

    class Items:
        """``Items[X]``, a list bem may send as null: read as ``list[X] | None``, then made a
        list by its model's ``__post_init__``."""

        def __class_getitem__(cls, item: object) -> object:
            return list[item] | None


def _listed(items: list[_Item] | None) -> list[_Item]:
    """A list that bem may send as null, as a list."""
    return [] if items is None else items


def _wire(name: str) -> Any:
    """An optional field, named ``name`` on the wire."""
    return msgspec.field(default=None, name=name)


def _items(name: str | None = None) -> Any:
    """A list field (``name`` on the wire, if not its own) that is empty unless sent."""
    return msgspec.field(default_factory=list, name=name)


class ApiModel(msgspec.Struct, kw_only=True, omit_defaults=True, repr_omit_defaults=True):
    """A shape of bem's answers: fields skipped when unknown, omitted when encoded as defaults."""


class ApiResponse(ApiModel):
    """A whole response body; :meth:`from_json` reads one.

    A response type builds its decoder when it first reads and keeps it, so a v3 drain never
    builds the v2 ones (a v3 call's, which every drain reads, are built with the module).
    Numbers sent as strings (``"itemOffset": "0"``) read as numbers.
    """

    _decoder: ClassVar[msgspec.json.Decoder[Any] | None] = None

    @classmethod
    def from_json(cls, content: bytes) -> Self:
        """The response in ``content``; raises one of :data:`UNREADABLE` when it is not one."""
        decoder: msgspec.json.Decoder[Self] | None = cls.__dict__.get("_decoder")
        if decoder is None:
            decoder = msgspec.json.Decoder(cls, strict=False)
            cls._decoder = decoder
        return decoder.decode(content)


# ---------------------------------------------------------------------------------------------
# Requests


class UploadFile(msgspec.Struct, frozen=True):
    """One file to send: read from disk only when the request is built."""

    path: Path
    input_type: str
    item_reference_id: str | None = None


SortOrder = Literal["asc", "desc"]
CallStatusFilter = Literal["pending", "running", "completed", "failed"]
CallTypeFilter = Literal["workflow", "direct_function", "adhoc_function"]


class CallFilter(msgspec.Struct, frozen=True):
    """Which calls ``GET /v3/calls`` lists: every filter bem takes, as one value."""

    call_ids: Sequence[str] = ()
    reference_ids: Sequence[str] = ()
    reference_id_substring: str | None = None
    workflow_ids: Sequence[str] = ()
    workflow_names: Sequence[str] = ()
    statuses: Sequence[CallStatusFilter] = ()
    call_types: Sequence[CallTypeFilter] = ()
    function_names: Sequence[str] = ()
    sort_order: SortOrder | None = None

    def query(self) -> dict[str, Sequence[str] | str | int | None]:
        """The query keys bem's API names them by (lists still to be joined)."""
        return {
            "callIDs": self.call_ids,
            "referenceIDs": self.reference_ids,
            "referenceIDSubstring": self.reference_id_substring,
            "workflowIDs": self.workflow_ids,
            "workflowNames": self.workflow_names,
            "statuses": self.statuses,
            "callTypes": self.call_types,
            "functionNames": self.function_names,
            "sortOrder": self.sort_order,
        }


# ---------------------------------------------------------------------------------------------
# v3 responses


class InputFileInfo(ApiModel):
    input_type: str | None = _wire("inputType")
    item_reference_id: str | None = _wire("itemReferenceID")
    s3_url: str | None = _wire("s3URL")


class BatchFilesInfo(ApiModel):
    inputs: Items[InputFileInfo] = _items()

    def __post_init__(self) -> None:
        self.inputs = _listed(self.inputs)


class CallInputInfo(ApiModel):
    single_file: InputFileInfo | None = _wire("singleFile")
    batch_files: BatchFilesInfo | None = _wire("batchFiles")


class OutputEvent(ApiModel):
    """A terminal non-error event (transform, extract, classify, split_item, or any newer type)."""

    event_id: str | None = _wire("eventID")
    event_type: str | None = _wire("eventType")
    reference_id: str | None = _wire("referenceID")
    item_offset: int | None = _wire("itemOffset")
    item_count: int | None = _wire("itemCount")
    transformed_content: Any = _wire("transformedContent")
    function_name: str | None = _wire("functionName")
    function_call_id: str | None = _wire("functionCallID")
    call_id: str | None = _wire("callID")
    created_at: str | None = _wire("createdAt")


class ErrorEvent(ApiModel):
    """A terminal error event (``eventType`` = "error")."""

    event_id: str | None = _wire("eventID")
    event_type: str | None = _wire("eventType")
    message: str | None = None
    kind: str | None = None
    reference_id: str | None = _wire("referenceID")
    item_offset: int | None = _wire("itemOffset")
    function_name: str | None = _wire("functionName")
    function_id: str | None = _wire("functionID")
    call_id: str | None = _wire("callID")
    created_at: str | None = _wire("createdAt")


class Call(ApiModel, dict=True):
    """A v3 call, as returned by invoke, get and list; one read from bem keeps its JSON as sent
    (:meth:`read`, :meth:`sent_json`)."""

    call_id: str = msgspec.field(name="callID")
    call_type: str | None = _wire("callType")
    status: str | None = None
    created_at: str | None = _wire("createdAt")
    finished_at: str | None = _wire("finishedAt")
    call_reference_id: str | None = _wire("callReferenceID")
    workflow_id: str | None = _wire("workflowID")
    workflow_name: str | None = _wire("workflowName")
    workflow_version_num: int | None = _wire("workflowVersionNum")
    input: CallInputInfo | None = None
    outputs: Items[OutputEvent] = _items()
    errors: Items[ErrorEvent] = _items()
    url: str | None = None
    trace_url: str | None = _wire("traceUrl")

    def __post_init__(self) -> None:
        self.outputs = _listed(self.outputs)
        self.errors = _listed(self.errors)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def sent_json(self) -> str:
        """The call's JSON as bem sent it, every field included, known or not (a call not read
        from bem: its fields that are not their defaults)."""
        sent: msgspec.Raw | None = vars(self).get(_SENT)
        if sent is None:
            return msgspec.json.encode(self).decode()
        return bytes(sent).decode()

    @classmethod
    def read(cls, sent: msgspec.Raw) -> Call:
        """The call in ``sent`` (one call's JSON), which it keeps for :meth:`sent_json`."""
        call = _CALL.decode(sent)
        vars(call)[_SENT] = sent
        return call


_SENT = "sent"
_NULL = msgspec.Raw(b"null")
_CALL = msgspec.json.Decoder(Call, strict=False)


class _SentCall(msgspec.Struct):
    """A :class:`CallResponse` with its call still as sent (``null`` when there is none)."""

    call: msgspec.Raw = _NULL
    error: str | None = None


class _SentCalls(msgspec.Struct):
    """A :class:`CallList` with each call still as sent."""

    calls: Items[msgspec.Raw] = _items()

    def __post_init__(self) -> None:
        self.calls = _listed(self.calls)


class CallResponse(ApiResponse):
    """``{"call": Call, "error"?: str}`` — invoke and get; ``call`` may be null."""

    call: Call | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, content: bytes) -> Self:
        sent = _SENT_CALL.decode(content)
        call = None if sent.call == _NULL else Call.read(sent.call)
        return cls(call=call, error=sent.error)


class CallList(ApiResponse):
    """``{"calls": [Call, ...]}`` — one page of ``GET /v3/calls``."""

    calls: Items[Call] = _items()

    def __post_init__(self) -> None:
        self.calls = _listed(self.calls)

    @classmethod
    def from_json(cls, content: bytes) -> Self:
        return cls(calls=[Call.read(sent) for sent in _SENT_CALLS.decode(content).calls])


_SENT_CALL = msgspec.json.Decoder(_SentCall, strict=False)
_SENT_CALLS = msgspec.json.Decoder(_SentCalls, strict=False)


# ---------------------------------------------------------------------------------------------
# v2 responses


class V2Activity(ApiModel):
    display_name: str | None = _wire("displayName")
    status: str | None = None


class V2FunctionCall(ApiModel):
    function_call_id: str | None = _wire("functionCallID")
    function_id: str | None = _wire("functionID")
    function_name: str | None = _wire("functionName")
    type: str | None = None
    reference_id: str | None = _wire("referenceID")
    status: str | None = None
    activity: Items[V2Activity] = _items()
    input_type: str | None = _wire("inputType")
    inputs: Items[InputFileInfo] = _items()

    def __post_init__(self) -> None:
        self.activity = _listed(self.activity)
        self.inputs = _listed(self.inputs)


class V2Call(ApiModel):
    call_id: str = msgspec.field(name="callID")
    call_type: str | None = _wire("callType")
    status: str | None = None
    created_at: str | None = _wire("createdAt")
    finished_at: str | None = _wire("finishedAt")
    workflow_id: str | None = _wire("workflowID")
    workflow_name: str | None = _wire("workflowName")
    call_reference_id: str | None = _wire("callReferenceID")
    function_calls: Items[V2FunctionCall] = _items("functionCalls")
    input: CallInputInfo | None = None

    def __post_init__(self) -> None:
        self.function_calls = _listed(self.function_calls)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class V2CallResponse(ApiResponse):
    call: V2Call | None = None
    error: str | None = None


class V2CreateResponse(ApiResponse):
    calls: Items[V2Call] = _items()
    error: str | None = None

    def __post_init__(self) -> None:
        self.calls = _listed(self.calls)


class V2CallRequest(msgspec.Struct, frozen=True):
    """One entry of ``POST /v2/calls``: a workflow and its files (one = singleFile)."""

    workflow_name: str
    call_reference_id: str
    files: tuple[UploadFile, ...]
    batch: bool = False
