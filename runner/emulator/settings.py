"""The emulator's knobs: latency, failures, faults and limits, validated as one model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runner.errors import ConfigError

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]


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
    retry_after_format: Literal["seconds", "http-date"] = "seconds"
    list_visibility_lag: Seconds = 0.0
    wait_timeout: Seconds = 30.0
    seed: int = 0

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
