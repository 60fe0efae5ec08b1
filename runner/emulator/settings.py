"""The emulator's knobs: latency, failures, faults and limits, validated as one struct."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
import msgspec.structs
from msgspec import Meta

from runner.errors import ConfigError
from runner.validation import FINITE, FieldProblem, explain

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Seconds = Annotated[float, Meta(ge=0.0, le=FINITE)]
Positive = Annotated[float, Meta(gt=0.0, le=FINITE)]
ErrorStatus = Annotated[int, Meta(ge=400, le=599)]
RedirectStatus = Literal[301, 302, 303, 307, 308]


class EmulatorSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """How the emulator behaves. Every field has a default; unknown fields are an error.

    :func:`parse_settings` validates types and bounds; the constructor, for code that knows its
    values, checks only that the latency range is ordered.
    """

    api_key: Annotated[str, Meta(min_length=1)] = "emulator-key"
    # Empty: every workflow name exists except names starting "unknown-".
    workflows: list[str] = msgspec.field(default_factory=list)
    latency_min: Seconds = 0.5
    latency_max: Seconds = 2.0
    failure_rate: Probability = 0.0
    error_5xx_rate: Probability = 0.0
    accept_then_500_rate: Probability = 0.0
    drop_rate: Probability = 0.0
    slow_rate: Probability = 0.0
    slow_seconds: Seconds = 5.0
    rate_limit_rps: Positive | None = None
    rate_limit_burst: Annotated[int, Meta(ge=1)] = 10
    # How a wait is announced: Retry-After in seconds or as an HTTP date, or retry-after-ms.
    retry_after_format: Literal["seconds", "http-date", "milliseconds"] = "seconds"
    # Answer a share of requests with error_status (without running the handler).
    error_rate: Probability = 0.0
    error_status: ErrorStatus = 409
    # x-should-retry on every emulated error answer (error_5xx, error_rate, 429, accept_then_500).
    should_retry_header: Literal["true", "false"] | None = None
    # A wait announced on emulated error answers other than 429 (which always announce one).
    fault_retry_after: Seconds | None = None
    # Redirect every API request to the same path under MOVED_PREFIX, which serves it.
    redirect_status: RedirectStatus | None = None
    # {"call": null} from GET /v3/calls/{callID} and from the invoke (whose call is created).
    null_call: bool = False
    # "outputs": null and "errors": null in every v3 call.
    null_events: bool = False
    list_visibility_lag: Seconds = 0.0
    wait_timeout: Seconds = 30.0
    seed: int = 0
    # Webhook deliveries (runner.emulator.deliveries): an event never delivered, delivered
    # twice, delayed, or overtaken by later ones; retries of non-2xx answers with backoff.
    webhook_drop_rate: Probability = 0.0
    webhook_duplicate_rate: Probability = 0.0
    webhook_delay: Seconds = 0.0
    webhook_reorder_seconds: Seconds = 0.0
    webhook_retry_base: Positive = 0.5
    webhook_max_attempts: Annotated[int, Meta(ge=1, le=100)] = 8
    webhook_timeout: Positive = 10.0

    def __post_init__(self) -> None:
        if self.latency_min > self.latency_max:
            raise FieldProblem("latency_min", f"must not exceed latency_max ({self.latency_max})")

    def workflow_exists(self, name: str) -> bool:
        if self.workflows:
            return name in self.workflows
        return not name.startswith("unknown-")

    def with_changes(self, changes: Mapping[str, object]) -> EmulatorSettings:
        """A copy with ``changes`` applied, validated as a whole; ConfigError when invalid."""
        return parse_settings({**msgspec.structs.asdict(self), **changes})

    def public_view(self) -> dict[str, Any]:
        """Every setting except the API key, which may be a real key taken from the environment."""
        view: dict[str, Any] = msgspec.to_builtins(self)
        del view["api_key"]
        return view


def parse_settings(data: Mapping[str, object]) -> EmulatorSettings:
    """Validate ``data`` as settings (leniently: ``"0.5"`` is a number); ConfigError naming the
    first bad field."""
    raw = dict(data)
    try:
        return msgspec.convert(raw, EmulatorSettings, strict=False)
    except msgspec.ValidationError as exc:
        problem = describe_validation_error(exc, raw)
        raise ConfigError(f"invalid emulator settings: {problem}") from exc


def describe_validation_error(exc: msgspec.ValidationError, raw: Mapping[str, object]) -> str:
    problem = explain(exc, raw, EmulatorSettings)
    if problem.unknown:
        return f"unknown setting {problem.key!r}"
    return f"{problem.key}: {problem.message}" if problem.key else problem.message
