"""The emulator's knobs: latency, failures, faults and limits, validated as one model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runner.errors import ConfigError

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]
ErrorStatus = Annotated[int, Field(ge=400, le=599)]
RedirectStatus = Literal[301, 302, 303, 307, 308]


class EmulatorSettings(BaseModel):
    """How the emulator behaves. Every field has a default; unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    api_key: str = Field(default="emulator-key", min_length=1)
    # Empty: every workflow name exists except names starting "unknown-".
    workflows: list[str] = Field(default_factory=list)
    latency_min: Seconds = 0.5
    latency_max: Seconds = 2.0
    failure_rate: Probability = 0.0
    error_5xx_rate: Probability = 0.0
    accept_then_500_rate: Probability = 0.0
    drop_rate: Probability = 0.0
    slow_rate: Probability = 0.0
    slow_seconds: Seconds = 5.0
    rate_limit_rps: Annotated[float, Field(gt=0.0)] | None = None
    rate_limit_burst: Annotated[int, Field(ge=1)] = 10
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
    webhook_retry_base: Annotated[float, Field(gt=0.0)] = 0.5
    webhook_max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    webhook_timeout: Annotated[float, Field(gt=0.0)] = 10.0

    @model_validator(mode="after")
    def _latency_range_is_ordered(self) -> Self:
        if self.latency_min > self.latency_max:
            raise ValueError(
                f"latency_min ({self.latency_min}) must not exceed latency_max ({self.latency_max})"
            )
        return self

    def workflow_exists(self, name: str) -> bool:
        if self.workflows:
            return name in self.workflows
        return not name.startswith("unknown-")

    def with_changes(self, changes: Mapping[str, object]) -> EmulatorSettings:
        """A copy with ``changes`` applied, validated as a whole; ConfigError when invalid."""
        return parse_settings({**self.model_dump(), **changes})

    def public_view(self) -> dict[str, Any]:
        """Every setting except the API key, which may be a real key taken from the environment."""
        return self.model_dump(exclude={"api_key"})


def parse_settings(data: Mapping[str, object]) -> EmulatorSettings:
    """Validate ``data`` as settings; ConfigError naming every bad field."""
    try:
        return EmulatorSettings.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"invalid emulator settings: {describe_validation_error(exc)}") from exc


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        parts.append(f"{location}: {error['msg']}" if location else str(error["msg"]))
    return "; ".join(parts)
