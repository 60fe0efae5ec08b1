"""The runner's configuration: a TOML file, validated, with a safe default for every setting.

The environment is read here and only here (``load_config``): ``BEM_API_KEY``, ``BEM_BASE_URL``,
``BEM_RUNNER_CONFIG`` and systemd's ``CREDENTIALS_DIRECTORY``.

The promise: a configuration that loads can run. Numbers are strict (no booleans, no strings
except for durations), finite and bounded; every path is resolved once, here (``~`` expanded,
made absolute against the current directory, symlinks resolved), and the inbox, outbox and
archive may not overlap; secrets are checked for what an HTTP header can carry. Anything else is
a :class:`ConfigError` naming the key, never another exception.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
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

from runner.credentials import SecretSource, resolve_secret
from runner.errors import ConfigError
from runner.policy import parse_duration
from runner.route import Route
from runner.store import DEFAULT_LEASE_SECONDS, is_postgres_url

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

MAX_CONFIG_BYTES = 1_000_000
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


# -- checks, as pure functions ----------------------------------------------------------------


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be bem's base URL; None if it can. Never repeats credentials."""
    if not url or any(not 0x21 <= ord(char) <= 0x7E for char in url):
        return "must be a URL of visible ASCII characters, e.g. https://api.bem.ai"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "must start with http:// or https://"
    if "@" in parts.netloc:
        return "must not carry credentials (user:password@); the key comes from BEM_API_KEY"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has port 0"
    if "?" in url or "#" in url:
        return "must not have a query (?...) or a fragment (#...)"
    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"is not a valid URL ({exc})"
    return None


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")


def host_port_problem(address: str) -> str | None:
    """Why ``address`` is not ``host:port``, ``[v6]:port`` or ``:port``; None if it is."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65_535:
        return "the port must be a number from 0 to 65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "the host in brackets must be an IPv6 address"
        return None
    if host and not _HOST_NAME.fullmatch(host):
        return "the host must be a name or an IP address (an IPv6 address in brackets)"
    return None


def overlapping_paths(paths: PathsConfig, *, archive_used: bool) -> str | None:
    """Why the configured folders cannot work together; None if they can.

    Folders the runner writes into must not be, or be inside, the folder it reads from (it would
    take its own documents as input), nor inside each other. The state database must not be in
    the inbox either.
    """
    folders = [("paths.inbox", paths.inbox), ("paths.outbox", paths.outbox)]
    if archive_used:
        folders.append(("paths.archive", paths.archive))
    for (key_a, a), (key_b, b) in combinations(folders, 2):
        if a == b:
            return f"{key_a} and {key_b} are the same folder ({a}); they must be separate"
        if a.is_relative_to(b) or b.is_relative_to(a):
            (inner_key, inner), (outer_key, outer) = sorted(
                ((key_a, a), (key_b, b)), key=lambda item: -len(item[1].parts)
            )
            return (
                f"{inner_key} ({inner}) is inside {outer_key} ({outer}); "
                "they must be separate folders"
            )
    state, inbox = paths.state, paths.inbox
    if state.is_relative_to(inbox):
        return f"paths.state ({state}) is inside paths.inbox ({inbox}); keep it out of the inbox"
    for key, folder in folders[1:]:
        if state == folder:
            return f"paths.state ({state}) is the folder {key}; it must be a file of its own"
    return None


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


def store_url_problem(url: str, *, password_allowed: bool) -> str | None:
    """Why ``url`` cannot name a store, or None. Never quotes the URL (it may hold a password)."""
    if not is_postgres_url(url):
        return "must be a postgresql:// URL"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "is not a valid URL"
    has_password = parts.password is not None or "password" in urllib.parse.parse_qs(parts.query)
    if has_password and not password_allowed:
        return (
            "holds a password: use PGPASSWORD, PGPASSFILE or $CREDENTIALS_DIRECTORY/store-password"
        )
    return None


def url_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be the receiver's URL path; None if it can."""
    if not path.startswith("/"):
        return "must start with /"
    if len(path) > 256:
        return "must be at most 256 characters"
    if any(not 0x21 <= ord(char) <= 0x7E for char in path) or "?" in path or "#" in path:
        return "must be visible ASCII without a query (?) or a fragment (#)"
    return None


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
        problem = overlapping_paths(self.paths, archive_used=self.inbox.on_done == "archive")
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
    raw = _read_toml(path, source or str(path)) if path is not None else {}
    if "api_key" in raw:
        raise ConfigError(
            f"{source}: api_key is not a setting; use BEM_API_KEY or api.api_key_file"
        )
    if "webhook_secrets" in raw:
        raise ConfigError(f"{source}: webhook_secrets is not a setting; use webhook.secret_file")
    env_base_url = environ.get("BEM_BASE_URL")
    if env_base_url:
        _check_env_base_url(env_base_url)
        _set(raw, "api.base_url", env_base_url, source)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(raw, dotted, value, source)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
    problem = wrong_kind_of_path(config.paths)
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


def wrong_kind_of_path(paths: PathsConfig) -> str | None:
    """Why a configured path that already exists cannot be used as what it is configured as.

    Nothing is created here: a path that does not exist yet is fine (it is made when needed).
    """
    for key in ("inbox", "outbox", "archive"):
        folder: Path = getattr(paths, key)
        if folder.exists() and not folder.is_dir():
            return f"paths.{key} ({folder}) exists and is not a folder"
    if paths.state.is_dir():
        return f"paths.state ({paths.state}) is a folder; it must name the state database file"
    return None


# -- reading and reporting --------------------------------------------------------------------


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: config file not found") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{source}: is a directory, not a config file") from exc
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL in the path
        raise ConfigError(f"{source}: cannot read config file: {exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02X} at offset {exc.start})"
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; deep nesting
        raise ConfigError(f"{source}: not valid TOML: {type(exc).__name__}: {exc}") from exc


def _set(raw: dict[str, Any], dotted: str, value: object, source: str | None) -> None:
    section, key = dotted.split(".", 1)
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        where = f"{source}: " if source else ""
        raise ConfigError(
            f"invalid configuration:\n  {where}{section}: must be a table ([{section}])"
        )
    table[key] = value


def _check_env_base_url(value: str) -> None:
    problem = base_url_problem(value)
    if problem is not None:
        shown = "" if "@" in value else f" (got {_shown(value)})"
        raise ConfigError(f"invalid configuration:\n  BEM_BASE_URL: {problem}{shown}")


def _describe(exc: ValidationError, source: str | None) -> str:
    where = f"{source}: " if source else ""
    lines: list[str] = []
    for error in exc.errors():
        key = _key(error["loc"])
        if error["type"] == "extra_forbidden":
            line = f"{where}unknown setting {key!r}"
        else:
            message = _TABLE_HINTS.get(error["type"], error["msg"]).removeprefix("Value error, ")
            if key == "route" and error["type"] == "tuple_type":
                message = "must be an array of tables: write each route as [[route]]"
            line = f"{where}{key}: {message}" if key else f"{where}{message}"
            if key and _may_show(key, error.get("input")):
                line += f" (got {_shown(error.get('input'))})"
        if line not in lines:
            lines.append(line)
    return "invalid configuration:\n  " + "\n  ".join(lines)


_TABLE_HINTS = {
    "model_type": "must be a table ([section] in TOML)",
    "model_attributes_type": "must be a table ([section] in TOML)",
    "dict_type": "must be a table ([section] in TOML)",
}


def _key(loc: tuple[int | str, ...]) -> str:
    """``section.key`` (``route.0.glob``) from a pydantic location, without its type tags."""
    parts = [str(p) for p in loc if isinstance(p, int) or p.isidentifier()]
    return ".".join(parts)


def _may_show(key: str, value: object) -> bool:
    """Values are shown to help, except a URL that may carry credentials."""
    if isinstance(value, dict):
        return False  # a whole table: the message says what is wrong in it
    if key == "store.url":
        return False  # a store URL may carry a password
    return not (key == "api.base_url" and isinstance(value, str) and "@" in value)


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
