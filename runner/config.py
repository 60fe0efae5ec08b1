"""The runner's configuration: a TOML file, validated, with a safe default for every setting.

The environment is read here and only here (``load_config``): ``BEM_API_KEY``, ``BEM_BASE_URL``,
``BEM_RUNNER_CONFIG`` and systemd's ``CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.errors import ConfigError
from runner.policy import parse_duration
from runner.route import Route

DEFAULT_BASE_URL = "https://api.bem.ai"
DEFAULT_ROOT = Path("/var/lib/bem-runner")

Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiConfig(Section):
    base_url: str = DEFAULT_BASE_URL
    version: Literal["v3", "v2"] = "v3"
    api_key_file: Path | None = None
    timeout_seconds: float = Field(default=60.0, gt=0)
    multipart_min_bytes: int = Field(default=10_000_000, ge=0)
    """Files at least this large are sent as multipart/form-data streamed from disk (v3 only)."""
    v2_calls_per_request: int = Field(default=10, ge=1, le=100)
    visibility_window: Duration = 30.0
    """How long a new call may be missing from ``GET /v3/calls`` before "not found" counts."""
    unreachable_timeout: Duration = 60.0
    """A drain stops (exit 3, state kept) when bem has been unreachable this long."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class LimitsConfig(Section):
    requests_per_second: float = Field(default=10.0, gt=0)
    burst: int = Field(default=10, ge=1)
    max_concurrency: int = Field(default=16, ge=1)
    max_open_calls: int = Field(default=5000, ge=1)


class PathsConfig(Section):
    inbox: Path = DEFAULT_ROOT / "inbox"
    outbox: Path = DEFAULT_ROOT / "outbox"
    archive: Path = DEFAULT_ROOT / "archive"
    state: Path = DEFAULT_ROOT / "state.db"


class InboxConfig(Section):
    settle_seconds: float = Field(default=2.0, ge=0)
    on_done: Literal["archive", "delete", "keep"] = "archive"
    max_file_bytes: int = Field(default=100_000_000, ge=1)
    rescan_seconds: float = Field(default=60.0, gt=0)
    """Full rescan of the inbox as a safety net beside file-system events."""


class PollConfig(Section):
    initial_seconds: float = Field(default=1.0, gt=0)
    max_seconds: float = Field(default=30.0, gt=0)
    give_up_after: Duration = 86_400.0
    calls_per_request: int = Field(default=50, ge=1, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> PollConfig:
        if self.max_seconds < self.initial_seconds:
            raise ValueError("max_seconds must be >= initial_seconds")
        return self


class RouteConfig(Section):
    glob: str = Field(min_length=1)
    workflow: str = Field(min_length=1)
    group: Literal["file", "folder", "window"] = "file"
    batch_max_files: int = Field(default=50, ge=1)
    batch_max_bytes: int = Field(default=50_000_000, ge=1)
    batch_window_seconds: float = Field(default=10.0, ge=0)

    def to_route(self) -> Route:
        return Route(
            glob=self.glob,
            workflow=self.workflow,
            group=self.group,
            batch_max_files=self.batch_max_files,
            batch_max_bytes=self.batch_max_bytes,
            batch_window_seconds=self.batch_window_seconds,
        )


class ServiceConfig(Section):
    graceful_timeout: Duration = 30.0
    """On SIGTERM, how long in-flight requests may take to finish; keep it under the unit's
    ``TimeoutStopSec=`` (systemd is asked for more time when finishing takes longer)."""
    metrics_addr: str | None = None
    """``host:port`` for Prometheus metrics of ``run``; ``status`` reads them from there too."""

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            _, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ValueError("expected host:port, e.g. 127.0.0.1:9464")
        return value


class Config(Section):
    api: ApiConfig = ApiConfig()
    limits: LimitsConfig = LimitsConfig()
    paths: PathsConfig = PathsConfig()
    inbox: InboxConfig = InboxConfig()
    poll: PollConfig = PollConfig()
    route: tuple[RouteConfig, ...] = ()
    service: ServiceConfig = ServiceConfig()
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Resolved from the environment or a file by :func:`load_config`, never from the TOML."""

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(r.to_route() for r in self.route)


def load_config(
    path: Path | None,
    *,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate the configuration; every problem is a :class:`ConfigError`.

    ``overrides`` are ``section.key`` → value pairs from command-line flags (``None`` values are
    ignored); they win over the file, ``BEM_BASE_URL`` wins over ``api.base_url`` in the file.
    """
    if path is None and environ.get("BEM_RUNNER_CONFIG"):
        path = Path(environ["BEM_RUNNER_CONFIG"])
    raw = _read_toml(path) if path is not None else {}
    if "api_key" in raw:
        raise ConfigError(f"{path}: api_key is not a setting; use BEM_API_KEY or api.api_key_file")
    if environ.get("BEM_BASE_URL"):
        raw.setdefault("api", {})["base_url"] = environ["BEM_BASE_URL"]
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            raw.setdefault(section, {})[key] = value
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc
    return config.model_copy(update={"api_key": _resolve_api_key(config, environ)})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"{where}unknown setting {key!r}")
        else:
            lines.append(f"{where}{key}: {error['msg']} (got {error.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _resolve_api_key(config: Config, environ: Mapping[str, str]) -> SecretStr | None:
    """``BEM_API_KEY``, else ``api.api_key_file``, else ``$CREDENTIALS_DIRECTORY/api-key``."""
    if environ.get("BEM_API_KEY"):
        return SecretStr(environ["BEM_API_KEY"].strip())
    candidates = []
    if config.api.api_key_file is not None:
        candidates.append(config.api.api_key_file)
    elif environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(environ["CREDENTIALS_DIRECTORY"]) / "api-key")
    for candidate in candidates:
        try:
            key = candidate.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{candidate}: cannot read API key file: {exc.strerror}") from exc
        if not key:
            raise ConfigError(f"{candidate}: API key file is empty")
        return SecretStr(key)
    return None
