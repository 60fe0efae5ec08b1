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

The sections are frozen msgspec structs: msgspec checks types, bounds and unknown keys, each
struct's ``__post_init__`` what a type cannot say (a URL, an address, the folders together).
Durations spelled as strings are read into seconds first (:func:`_durations_in_seconds`), and
paths are resolved as they are read (:func:`_decode`).
"""

# Without ``from __future__ import annotations``: msgspec reads the structs' annotations when it
# first converts, and resolving them from strings would cost a drain's start-up about 1.5 ms.
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.structs
from msgspec import Meta

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
    describe_problem,
    describe_validation_error,
    read_toml,
    set_key,
)
from runner.credentials import Secret, SecretSource, resolve_secret
from runner.errors import ConfigError
from runner.policy import parse_duration
from runner.route import Route
from runner.store import DEFAULT_LEASE_SECONDS
from runner.validation import EXPECTED, FieldProblem, Problem, meta_extra

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
NOT_SETTINGS = {
    "api_key": "use BEM_API_KEY or api.api_key_file",
    "webhook_secrets": "use webhook.secret_file",
    "store_url": "use store.url or BEM_RUNNER_STORE_URL",
}
"""Fields :func:`load_config` sets from elsewhere, never from the file: what to use instead."""

HOUR = 3_600.0
DAY = 86_400.0
MAX_BYTES = 10_000_000_000
"""Largest file or batch size, in bytes (10 GB)."""
_DURATION = {"duration": True, EXPECTED: 'a number of seconds or a duration such as "30s"'}


def _duration(*, le: float, ge: float = 0.0, gt: float | None = None) -> Meta:
    """Bounds of a duration: seconds, which the file may also spell as a string such as
    ``"30s"``, ``"90m"`` or ``"1h30m"`` (read by :func:`_durations_in_seconds` first)."""
    if gt is not None:
        return Meta(gt=gt, le=le, extra=_DURATION)
    return Meta(ge=ge, le=le, extra=_DURATION)


def _resolved_path(value: object) -> Path:
    """A path setting: a non-empty string (or a flag's Path), ``~`` expanded, absolute against
    the current directory, symlinks resolved."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("a path cannot be empty")
    elif not isinstance(value, Path):
        raise TypeError("must be a path, as a string")
    path = Path(value)
    try:
        return path.expanduser().resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as exc:  # no home for ~user; a loop; a NUL
        raise ValueError(f"cannot resolve {str(path)!r}: {exc}") from exc


def _default_path(name: str) -> Path:
    """A field whose default is ``name`` under :data:`DEFAULT_ROOT`, resolved as given ones are."""
    return msgspec.field(default_factory=functools.partial(_resolved_path, DEFAULT_ROOT / name))


def _decode(kind: type, value: object) -> object:
    """A setting of a type msgspec does not read itself: a path is resolved."""
    if kind is Path:
        return _resolved_path(value)
    raise TypeError("cannot be set in the configuration")


class Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A table of the configuration: unknown keys refused, unchangeable once loaded (each
    section says ``frozen=True`` again, as type checkers read a struct's options)."""


class ApiConfig(Section, frozen=True):
    base_url: str = DEFAULT_BASE_URL
    version: Literal["v3", "v2"] = "v3"
    api_key_file: Path | None = None
    timeout_seconds: Annotated[float, Meta(gt=0, le=HOUR)] = 60.0
    multipart_min_bytes: Annotated[int, Meta(ge=0, le=MAX_BYTES)] = 10_000_000
    """Files at least this large are sent as multipart/form-data streamed from disk (v3 only)."""
    v2_calls_per_request: Annotated[int, Meta(ge=1, le=100)] = 10
    visibility_window: Annotated[float, _duration(le=DAY)] = 30.0
    """How long a new call may be missing from ``GET /v3/calls`` before "not found" counts."""
    unreachable_timeout: Annotated[float, _duration(le=7 * DAY)] = 60.0
    """A drain stops (exit 3, state kept) when bem has been unreachable this long."""

    def __post_init__(self) -> None:
        problem = base_url_problem(self.base_url)
        if problem is not None:
            raise FieldProblem("base_url", problem)
        msgspec.structs.force_setattr(self, "base_url", self.base_url.rstrip("/"))


class LimitsConfig(Section, frozen=True):
    requests_per_second: Annotated[float, Meta(ge=0.01, le=10_000)] = 10.0
    burst: Annotated[int, Meta(ge=1, le=10_000)] = 10
    max_concurrency: Annotated[int, Meta(ge=1, le=1_024)] = 16
    max_open_calls: Annotated[int, Meta(ge=1, le=1_000_000)] = 5000


class PathsConfig(Section, frozen=True):
    inbox: Path = _default_path("inbox")
    outbox: Path = _default_path("outbox")
    archive: Path = _default_path("archive")
    state: Path = _default_path("state.db")


class InboxConfig(Section, frozen=True):
    settle_seconds: Annotated[float, Meta(ge=0, le=HOUR)] = 2.0
    on_done: Literal["archive", "delete", "keep"] = "archive"
    max_file_bytes: Annotated[int, Meta(ge=1, le=MAX_BYTES)] = 100_000_000
    rescan_seconds: Annotated[float, Meta(ge=0.01, le=DAY)] = 60.0
    """Full rescan of the inbox as a safety net beside file-system events."""
    dedupe: Literal["off", "content"] = "off"
    """``content``: a single file whose content, workflow and inputType already have a
    completed result in the store gets a copy of it, with no call (:mod:`runner.dedupe`)."""


class PollConfig(Section, frozen=True):
    initial_seconds: Annotated[float, Meta(ge=0.001, le=HOUR)] = 1.0
    max_seconds: Annotated[float, Meta(ge=0.001, le=HOUR)] = 30.0
    give_up_after: Annotated[float, _duration(gt=0, le=90 * DAY)] = 86_400.0
    calls_per_request: Annotated[int, Meta(ge=1, le=100)] = 50

    def __post_init__(self) -> None:
        if self.max_seconds < self.initial_seconds:
            raise FieldProblem("max_seconds", "must be >= poll.initial_seconds")


RouteConfig = Route
"""A ``[[route]]`` table is validated by the route struct itself: one set of rules."""


class ServiceConfig(Section, frozen=True):
    graceful_timeout: Annotated[float, _duration(le=HOUR)] = 30.0
    """On SIGTERM, how long in-flight requests may take to finish; keep it under the unit's
    ``TimeoutStopSec=`` (systemd is asked for more time when finishing takes longer)."""
    metrics_addr: str | None = None
    """``host:port`` for Prometheus metrics of ``run``; ``status`` reads them from there too."""

    def __post_init__(self) -> None:
        if self.metrics_addr is not None:
            problem = host_port_problem(self.metrics_addr)
            if problem is not None:
                raise FieldProblem(
                    "metrics_addr", f"{problem}; expected host:port, e.g. 127.0.0.1:9464"
                )


class StoreConfig(Section, frozen=True):
    url: str | None = None
    """A ``postgresql://`` URL shared by several runners; absent: SQLite at ``paths.state``."""
    lease_seconds: Annotated[float, Meta(gt=0, le=HOUR)] = DEFAULT_LEASE_SECONDS
    runner_id: Annotated[str, Meta(max_length=200)] = ""

    def __post_init__(self) -> None:
        if self.url is not None:
            problem = store_url_problem(self.url, password_allowed=False)
            if problem is not None:
                raise FieldProblem("url", problem)


class WebhookConfig(Section, frozen=True):
    listen: str | None = None
    """``host:port`` of the webhook receiver; None: no receiver, polling only."""
    path: str = "/bem/webhook"
    tolerance_seconds: Annotated[float, Meta(gt=0, le=HOUR)] = 300.0
    """A signature whose timestamp is further than this from now is refused."""
    secret_file: Path | None = None
    previous_secret_file: Path | None = None
    overdue_after: Annotated[float, _duration(ge=0.1, le=DAY)] = 60.0
    """While events flow, a call without one is polled as usual once it is overdue: older than
    calls take to produce their events (learned from them), or than this before any arrived."""
    safety_net: Annotated[float, _duration(ge=1.0, le=DAY)] = 300.0
    """While events flow, a call that is not yet overdue is still polled this often."""
    max_concurrency: Annotated[int, Meta(ge=1, le=1_024)] = 16
    """Events recorded at the same time; more wait (and beyond four times this, 503)."""

    def __post_init__(self) -> None:
        if self.listen is not None:
            problem = host_port_problem(self.listen)
            if problem is not None:
                raise FieldProblem("listen", f"{problem}; expected host:port, e.g. 0.0.0.0:8765")
        problem = url_path_problem(self.path)
        if problem is not None:
            raise FieldProblem("path", problem)


class Config(Section, frozen=True):
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    inbox: InboxConfig = msgspec.field(default_factory=InboxConfig)
    poll: PollConfig = msgspec.field(default_factory=PollConfig)
    route: tuple[Route, ...] = ()
    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    api_key: Secret | None = None
    """Resolved from the environment or a file by :func:`load_config`, never from the TOML."""
    webhook_secrets: tuple[Secret, ...] = ()
    """The webhook signing secret, then the previous one while rotating (by :func:`load_config`)."""
    store_url: Secret | None = None
    """``BEM_RUNNER_STORE_URL`` (which may carry a password), else ``store.url``."""

    @property
    def store_target(self) -> str | Path:
        """What :func:`runner.store.open_store` opens: the store URL, else the SQLite state."""
        return self.store_url.get_secret_value() if self.store_url else self.paths.state

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes, validated and built once, at load."""
        return self.route

    def __post_init__(self) -> None:
        paths = self.paths
        written = {"paths.outbox": paths.outbox}
        if self.inbox.on_done == "archive":
            written["paths.archive"] = paths.archive
        problem = overlapping_paths(inbox=paths.inbox, written=written, state=paths.state)
        if problem is not None:
            raise ValueError(problem)


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
    for name, instead in NOT_SETTINGS.items():
        if name in raw:
            raise ConfigError(f"{source}: {name} is not a setting; {instead}")
    env_base_url = environ.get("BEM_BASE_URL")
    if env_base_url:
        check_env_base_url(env_base_url)
        set_key(raw, "api.base_url", env_base_url, source)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_key(raw, dotted, value, source)
    try:
        config = msgspec.convert(
            _durations_in_seconds(raw, source), Config, strict=True, dec_hook=_decode
        )
    except msgspec.ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, raw, Config, source)) from exc
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
    return msgspec.structs.replace(
        config,
        api_key=api_key,
        store_url=Secret(store_url) if store_url else None,
        webhook_secrets=secrets,
    )


def webhook_secrets(webhook: WebhookConfig, environ: Mapping[str, str]) -> tuple[Secret, ...]:
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


def _durations_in_seconds(raw: dict[str, Any], source: str | None) -> dict[str, Any]:
    """``raw`` with each duration the file spells as a string (``"90m"``) in seconds, for the
    bounds of its setting to check; a string that is no duration is a :class:`ConfigError`."""
    spelled = dict(raw)
    for section, keys in _duration_keys().items():
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if not isinstance(value, str):
                continue
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                problem = Problem(f"{section}.{key}", str(exc), value)
                raise ConfigError(describe_problem(problem, source)) from exc
            spelled[section] = {**spelled[section], key: seconds}
    return spelled


@functools.cache
def _duration_keys() -> dict[str, tuple[str, ...]]:
    """The duration settings of each section, as their types mark them."""
    keys: dict[str, tuple[str, ...]] = {}
    for section in msgspec.structs.fields(Config):
        if isinstance(section.type, type) and issubclass(section.type, Section):
            keys[section.name] = tuple(
                field.name
                for field in msgspec.structs.fields(section.type)
                if meta_extra(field.type).get("duration")
            )
    return keys
