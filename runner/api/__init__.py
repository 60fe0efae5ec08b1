"""The bem API as the runner uses it: :class:`BemClient` and the typed request/response models."""

from runner.api.checks import call_mismatch
from runner.api.client import BemClient, parse_retry_after
from runner.api.encoding import header_value_problem
from runner.api.models import (
    TERMINAL_STATUSES,
    Call,
    CallFilter,
    ErrorEvent,
    OutputEvent,
    UploadFile,
    V2Call,
    V2CallRequest,
)

__all__ = [
    "TERMINAL_STATUSES",
    "BemClient",
    "Call",
    "CallFilter",
    "ErrorEvent",
    "OutputEvent",
    "UploadFile",
    "V2Call",
    "V2CallRequest",
    "call_mismatch",
    "header_value_problem",
    "parse_retry_after",
]
