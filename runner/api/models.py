"""Typed shapes of the bem API, v3 and v2.

Every model ignores nothing and rejects nothing it does not know: unknown fields are kept
(``extra="allow"``) and unknown event types parse as a plain :class:`OutputEvent`, because bem
adds fields and event types over time and the runner must keep working when it does.
A list sent as ``null`` (``"outputs": null``) reads as an empty list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

CallStatus = Literal["pending", "running", "completed", "failed"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed"})


_Item = TypeVar("_Item")


def _null_as_empty(value: object) -> object:
    return [] if value is None else value


# A list that bem may send as null.
Items = Annotated[list[_Item], BeforeValidator(_null_as_empty)]


class ApiModel(BaseModel):
    # Each model builds its validator when it first parses: a drain parses responses only, so
    # the nested models (built into their parents' validators) and, on v3, the v2 ones never
    # build their own.
    model_config = ConfigDict(extra="allow", populate_by_name=True, defer_build=True)


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class UploadFile:
    """One file to send: read from disk only when the request is built."""

    path: Path
    input_type: str
    item_reference_id: str | None = None


SortOrder = Literal["asc", "desc"]
CallStatusFilter = Literal["pending", "running", "completed", "failed"]
CallTypeFilter = Literal["workflow", "direct_function", "adhoc_function"]


@dataclass(frozen=True)
class CallFilter:
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
    input_type: str | None = Field(default=None, alias="inputType")
    item_reference_id: str | None = Field(default=None, alias="itemReferenceID")
    s3_url: str | None = Field(default=None, alias="s3URL")


class BatchFilesInfo(ApiModel):
    inputs: Items[InputFileInfo] = Field(default_factory=list)


class CallInputInfo(ApiModel):
    single_file: InputFileInfo | None = Field(default=None, alias="singleFile")
    batch_files: BatchFilesInfo | None = Field(default=None, alias="batchFiles")


class OutputEvent(ApiModel):
    """A terminal non-error event (transform, extract, classify, split_item, or any newer type)."""

    event_id: str | None = Field(default=None, alias="eventID")
    event_type: str | None = Field(default=None, alias="eventType")
    reference_id: str | None = Field(default=None, alias="referenceID")
    item_offset: int | None = Field(default=None, alias="itemOffset")
    item_count: int | None = Field(default=None, alias="itemCount")
    transformed_content: Any = Field(default=None, alias="transformedContent")
    function_name: str | None = Field(default=None, alias="functionName")
    function_call_id: str | None = Field(default=None, alias="functionCallID")
    call_id: str | None = Field(default=None, alias="callID")
    created_at: str | None = Field(default=None, alias="createdAt")


class ErrorEvent(ApiModel):
    """A terminal error event (``eventType`` = "error")."""

    event_id: str | None = Field(default=None, alias="eventID")
    event_type: str | None = Field(default=None, alias="eventType")
    message: str | None = None
    kind: str | None = None
    reference_id: str | None = Field(default=None, alias="referenceID")
    item_offset: int | None = Field(default=None, alias="itemOffset")
    function_name: str | None = Field(default=None, alias="functionName")
    function_id: str | None = Field(default=None, alias="functionID")
    call_id: str | None = Field(default=None, alias="callID")
    created_at: str | None = Field(default=None, alias="createdAt")


class Call(ApiModel):
    """A v3 call, as returned by invoke, get and list."""

    call_id: str = Field(alias="callID")
    call_type: str | None = Field(default=None, alias="callType")
    status: str | None = None
    created_at: str | None = Field(default=None, alias="createdAt")
    finished_at: str | None = Field(default=None, alias="finishedAt")
    call_reference_id: str | None = Field(default=None, alias="callReferenceID")
    workflow_id: str | None = Field(default=None, alias="workflowID")
    workflow_name: str | None = Field(default=None, alias="workflowName")
    workflow_version_num: int | None = Field(default=None, alias="workflowVersionNum")
    input: CallInputInfo | None = None
    outputs: Items[OutputEvent] = Field(default_factory=list)
    errors: Items[ErrorEvent] = Field(default_factory=list)
    url: str | None = None
    trace_url: str | None = Field(default=None, alias="traceUrl")

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class CallResponse(ApiModel):
    """``{"call": Call, "error"?: str}`` — invoke and get; ``call`` may be null."""

    call: Call | None = None
    error: str | None = None


class CallList(ApiModel):
    """``{"calls": [Call, ...]}`` — one page of ``GET /v3/calls``."""

    calls: Items[Call] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# v2 responses


class V2Activity(ApiModel):
    display_name: str | None = Field(default=None, alias="displayName")
    status: str | None = None


class V2FunctionCall(ApiModel):
    function_call_id: str | None = Field(default=None, alias="functionCallID")
    function_id: str | None = Field(default=None, alias="functionID")
    function_name: str | None = Field(default=None, alias="functionName")
    type: str | None = None
    reference_id: str | None = Field(default=None, alias="referenceID")
    status: str | None = None
    activity: Items[V2Activity] = Field(default_factory=list)
    input_type: str | None = Field(default=None, alias="inputType")
    inputs: Items[InputFileInfo] = Field(default_factory=list)


class V2Call(ApiModel):
    call_id: str = Field(alias="callID")
    call_type: str | None = Field(default=None, alias="callType")
    status: str | None = None
    created_at: str | None = Field(default=None, alias="createdAt")
    finished_at: str | None = Field(default=None, alias="finishedAt")
    workflow_id: str | None = Field(default=None, alias="workflowID")
    workflow_name: str | None = Field(default=None, alias="workflowName")
    call_reference_id: str | None = Field(default=None, alias="callReferenceID")
    function_calls: Items[V2FunctionCall] = Field(default_factory=list, alias="functionCalls")
    input: CallInputInfo | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class V2CallResponse(ApiModel):
    call: V2Call | None = None
    error: str | None = None


class V2CreateResponse(ApiModel):
    calls: Items[V2Call] = Field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class V2CallRequest:
    """One entry of ``POST /v2/calls``: a workflow and its files (one = singleFile)."""

    workflow_name: str
    call_reference_id: str
    files: tuple[UploadFile, ...]
    batch: bool = False
