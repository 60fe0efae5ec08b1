"""The runner's configuration: a TOML file, validated, with a safe default for every setting.

The environment is read here and only here (``load_config``): ``BEM_API_KEY``, ``BEM_BASE_URL``,
``BEM_RUNNER_CONFIG``, ``BEM_RUNNER_STORE_URL``, ``BEM_WEBHOOK_SECRET``,
``BEM_WEBHOOK_PREVIOUS_SECRET`` and systemd's ``CREDENTIALS_DIRECTORY``. Checks of single values
are in :mod:`runner.config_checks`; reading the file and wording its errors, in
:mod:`runner.config_file`.

The promise: a configuration that loads can run. Numbers are strict (no booleans, no strings
except for durations), finite and bounded; every path is resolved once, here (``~`` expanded,
made absolute against the current directory, symlinks resolved), and the inbox, outbox and
archive may not overlap; secrets are checked for what an HTTP header can carry. Anything else is
a :class:`ConfigError` naming the key, never another exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.config_checks import (
    base_url_problem,
    host_port_problem,
    overlapping_paths,
    store_url_problem,
    url_path_problem,
    wrong_kind_of_path,
)
from runner.config_file import (
    check_env_base_url,
    describe_validation_error,
    read_toml,
    set_key,
)
from runner.credentials import SecretSource, resolve_secret
from runner.errors import ConfigError
from runner.policy import parse_duration
from runner.route import Route
from runner.store import DEFAULT_LEASE_SECONDS

DEFAULT_BASE_URL = "https://api.bem.ai"
DEFAULT_ROOT = Path("/var/lib/bem-runner")
API_KEY = SecretSource(
    what="API key", env_var="BEM_API_KEY", file_key="api.api_key_file", credential="api-key"
)

WEBHOOK_SECRET = SecretSource(
    what="webhook secret",
    env_var="BEM_WEBHOOK_SECRET",
    file_key="webhook.secret_file",
    credential="webhook-secret",
)
WEBHOOK_PREVIOUS_SECRET = SecretSource(
    what="previous webhook secret",
    env_var="BEM_WEBHOOK_PREVIOUS_SECRET",
    file_key="webhook.previous_secret_file",
    credential="webhook-previous-secret",
)

MAX_DURATION_SECONDS = 365 * 86_400.0
"""No duration setting may be longer than a year; each setting has its own, lower bound too."""
HOUR = 3_600.0
DAY = 86_400.0
MAX_BYTES = 10_000_000_000
"""Largest file or batch size, in bytes (10 GB)."""


def _duration(value: object) -> float:
    try:
        return parse_duration(value)  # type: ignore[arg-type]  # it checks the type itself
    except OverflowError as exc:  # an integer too large for a float
        raise ValueError(
            f"a duration must be a number of seconds below {MAX_DURATION_SECONDS:.0f}"
        ) from exc


Duration = Annotated[
    float, BeforeValidator(_duration), Field(ge=0, le=MAX_DURATION_SECONDS, allow_inf_nan=False)
]
"""Seconds: a number or a string such as ``"30s"``, ``"90m"``, ``"1h30m"``."""


def _seconds(default: float, *, le: float, gt: float | None = None, ge: float | None = None) -> Any:
    """A plain number of seconds (an int or a float, never a bool or a string), finite."""
    return Field(default=default, gt=gt, ge=ge, le=le, strict=True, allow_inf_nan=False)


def _count(default: int, *, ge: int, le: int) -> Any:
    """A whole number (never a bool, a float or a string)."""
    return Field(default=default, ge=ge, le=le, strict=True)


def _non_empty_path(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("a path cannot be empty")
    return value


def _resolved(path: Path) -> Path:
    """``~`` expanded, absolute against the current directory, symlinks resolved."""
    try:
        return path.expanduser().resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # no home directory for ~user; a symlink loop
        raise ValueError(f"cannot resolve {str(path)!r}: {exc}") from exc


ResolvedPath = Annotated[Path, BeforeValidator(_non_empty_path), AfterValidator(_resolved)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ApiConfig(Section):
    base_url: str = Field(default=DEFAULT_BASE_URL, strict=True)
    version: Literal["v3", "v2"] = "v3"
    api_key_file: ResolvedPath | None = None
    timeout_seconds: float = _seconds(60.0, gt=0, le=HOUR)
    multipart_min_bytes: int = _count(10_000_000, ge=0, le=MAX_BYTES)
    """Files at least this large are sent as multipart/form-data streamed from disk (v3 only)."""
    v2_calls_per_request: int = _count(10, ge=1, le=100)
    visibility_window: Duration = Field(default=30.0, le=DAY)
    """How long a new call may be missing from ``GET /v3/calls`` before "not found" counts."""
    unreachable_timeout: Duration = Field(default=60.0, le=7 * DAY)
    """A drain stops (exit 3, state kept) when bem has been unreachable this long."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        problem = base_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value.rstrip("/")


class LimitsConfig(Section):
    requests_per_second: float = _seconds(10.0, ge=0.01, le=10_000)
    burst: int = _count(10, ge=1, le=10_000)
    max_concurrency: int = _count(16, ge=1, le=1_024)
    max_open_calls: int = _count(5000, ge=1, le=1_000_000)


class PathsConfig(Section):
    inbox: ResolvedPath = DEFAULT_ROOT / "inbox"
    outbox: ResolvedPath = DEFAULT_ROOT / "outbox"
    archive: ResolvedPath = DEFAULT_ROOT / "archive"
    state: ResolvedPath = DEFAULT_ROOT / "state.db"


class InboxConfig(Section):
    settle_seconds: float = _seconds(2.0, ge=0, le=HOUR)
    on_done: Literal["archive", "delete", "keep"] = "archive"
    max_file_bytes: int = _count(100_000_000, ge=1, le=MAX_BYTES)
    rescan_seconds: float = _seconds(60.0, ge=0.01, le=DAY)
    """Full rescan of the inbox as a safety net beside file-system events."""
    dedupe: Literal["off", "content"] = "off"
    """``content``: a single file whose content, workflow and inputType already have a
    completed result in the store gets a copy of it, with no call (:mod:`runner.dedupe`)."""


class PollConfig(Section):
    initial_seconds: float = _seconds(1.0, ge=0.001, le=HOUR)
    max_seconds: float = _seconds(30.0, ge=0.001, le=HOUR)
    give_up_after: Duration = Field(default=86_400.0, gt=0, le=90 * DAY)
    calls_per_request: int = _count(50, ge=1, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> PollConfig:
        if self.max_seconds < self.initial_seconds:
            raise ValueError("poll.max_seconds must be >= poll.initial_seconds")
        return self


RouteConfig = Route
"""A ``[[route]]`` table is validated by the route model itself: one set of rules."""


class ServiceConfig(Section):
    graceful_timeout: Duration = Field(default=30.0, le=HOUR)
    """On SIGTERM, how long in-flight requests may take to finish; keep it under the unit's
    ``TimeoutStopSec=`` (systemd is asked for more time when finishing takes longer)."""
    metrics_addr: str | None = Field(default=None, strict=True)
    """``host:port`` for Prometheus metrics of ``run``; ``status`` reads them from there too."""

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            problem = host_port_problem(value)
            if problem is not None:
                raise ValueError(f"{problem}; expected host:port, e.g. 127.0.0.1:9464")
        return value


class StoreConfig(Section):
    url: str | None = Field(default=None, strict=True)
    """A ``postgresql://`` URL shared by several runners; absent: SQLite at ``paths.state``."""
    lease_seconds: float = Field(default=DEFAULT_LEASE_SECONDS, gt=0, le=HOUR, allow_inf_nan=False)
    runner_id: str = Field(default="", strict=True, max_length=200)

    @field_validator("url")
    @classmethod
    def _postgres_url_without_password(cls, url: str | None) -> str | None:
        if url is not None:
            problem = store_url_problem(url, password_allowed=False)
            if problem is not None:
                raise ValueError(problem)
        return url


class WebhookConfig(Section):
    listen: str | None = Field(default=None, strict=True)
    """``host:port`` of the webhook receiver; None: no receiver, polling only."""
    path: str = Field(default="/bem/webhook", strict=True)
    tolerance_seconds: float = _seconds(300.0, gt=0, le=HOUR)
    """A signature whose timestamp is further than this from now is refused."""
    secret_file: ResolvedPath | None = None
    previous_secret_file: ResolvedPath | None = None
    overdue_after: Duration = Field(default=60.0, ge=0.1, le=DAY)
    """While events flow, a call without one is polled as usual once it is overdue: older than
    calls take to produce their events (learned from them), or than this before any arrived."""
    safety_net: Duration = Field(default=300.0, ge=1.0, le=DAY)
    """While events flow, a call that is not yet overdue is still polled this often."""
    max_concurrency: int = _count(16, ge=1, le=1_024)
    """Events recorded at the same time; more wait (and beyond four times this, 503)."""

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            problem = host_port_problem(value)
            if problem is not None:
                raise ValueError(f"{problem}; expected host:port, e.g. 0.0.0.0:8765")
        return value

    @field_validator("path")
    @classmethod
    def _url_path(cls, value: str) -> str:
        problem = url_path_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class Config(Section):
    api: ApiConfig = ApiConfig()
    limits: LimitsConfig = LimitsConfig()
    paths: PathsConfig = PathsConfig()
    inbox: InboxConfig = InboxConfig()
    poll: PollConfig = PollConfig()
    route: tuple[Route, ...] = ()
    service: ServiceConfig = ServiceConfig()
    store: StoreConfig = StoreConfig()
    webhook: WebhookConfig = WebhookConfig()
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Resolved from the environment or a file by :func:`load_config`, never from the TOML."""
    webhook_secrets: tuple[SecretStr, ...] = Field(default=(), exclude=True, repr=False)
    """The webhook signing secret, then the previous one while rotating (by :func:`load_config`)."""

    store_url: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """``BEM_RUNNER_STORE_URL`` (which may carry a password), else ``store.url``."""

    @property
    def store_target(self) -> str | Path:
        """What :func:`runner.store.open_store` opens: the store URL, else the SQLite state."""
        return self.store_url.get_secret_value() if self.store_url else self.paths.state

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes, validated and built once, at load."""
        return self.route

    @model_validator(mode="after")
    def _separate_folders(self) -> Config:
        paths = self.paths
        written = {"paths.outbox": paths.outbox}
        if self.inbox.on_done == "archive":
            written["paths.archive"] = paths.archive
        problem = overlapping_paths(inbox=paths.inbox, written=written, state=paths.state)
        if problem is not None:
            raise ValueError(problem)
        return self


def load_config(
    path: Path | None,
    *,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
    webhook_secrets_needed: bool = True,
) -> Config:
    """Read, merge and validate the configuration; every problem is a :class:`ConfigError`.

    ``webhook_secrets_needed=False`` (``webhook setup``, which creates the secret) skips them.

    ``overrides`` are ``section.key`` → value pairs from command-line flags (``None`` values are
    ignored); they win over the file, ``BEM_BASE_URL`` wins over ``api.base_url`` in the file.
    Relative paths, in the file as in flags, are relative to the current directory.
    """
    source = str(path) if path is not None else None
    if path is None and environ.get("BEM_RUNNER_CONFIG"):
        path = Path(environ["BEM_RUNNER_CONFIG"])
        source = f"{path} (BEM_RUNNER_CONFIG)"
    raw = read_toml(path, source or str(path)) if path is not None else {}
    if "api_key" in raw:
        raise ConfigError(
            f"{source}: api_key is not a setting; use BEM_API_KEY or api.api_key_file"
        )
    if "webhook_secrets" in raw:
        raise ConfigError(f"{source}: webhook_secrets is not a setting; use webhook.secret_file")
    env_base_url = environ.get("BEM_BASE_URL")
    if env_base_url:
        check_env_base_url(env_base_url)
        set_key(raw, "api.base_url", env_base_url, source)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_key(raw, dotted, value, source)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc
    folders = {f"paths.{key}": getattr(config.paths, key) for key in ("inbox", "outbox", "archive")}
    problem = wrong_kind_of_path(folders, config.paths.state)
    if problem is not None:
        raise ConfigError(f"invalid configuration:\n  {problem}")
    api_key = resolve_secret(API_KEY, environ=environ, file=config.api.api_key_file)
    env_store_url = environ.get("BEM_RUNNER_STORE_URL")
    if env_store_url and (problem := store_url_problem(env_store_url, password_allowed=True)):
        raise ConfigError(f"invalid configuration:\n  BEM_RUNNER_STORE_URL: {problem}")
    flag_store_url = (overrides or {}).get("store.url")
    store_url = flag_store_url or env_store_url or config.store.url
    secrets = webhook_secrets(config.webhook, environ) if webhook_secrets_needed else ()
    return config.model_copy(
        update={
            "api_key": api_key,
            "store_url": SecretStr(store_url) if store_url else None,
            "webhook_secrets": secrets,
        }
    )


def webhook_secrets(webhook: WebhookConfig, environ: Mapping[str, str]) -> tuple[SecretStr, ...]:
    """The current secret and, while rotating, the previous one; a receiver needs the first."""
    current = resolve_secret(WEBHOOK_SECRET, environ=environ, file=webhook.secret_file)
    previous = resolve_secret(
        WEBHOOK_PREVIOUS_SECRET, environ=environ, file=webhook.previous_secret_file
    )
    if current is None and webhook.listen is not None:
        raise ConfigError(
            "invalid configuration:\n  webhook.listen is set but there is no signing secret: "
            "set BEM_WEBHOOK_SECRET, webhook.secret_file or the credential webhook-secret "
            "(bem-runner webhook setup creates one)"
        )
    return tuple(secret for secret in (current, previous) if secret is not None)
