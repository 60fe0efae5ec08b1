"""The configuration file: read as TOML (bounded, UTF-8), keys set from flags and the
environment, and validation errors told as the file's own keys."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from runner.config_checks import base_url_problem
from runner.errors import ConfigError
from runner.validation import NOT_GIVEN, Problem, explain

MAX_CONFIG_BYTES = 1_000_000
SHOWN_VALUE_CHARS = 80
"""A value quoted in an error message is cut to this many characters."""


def read_toml(path: Path, source: str) -> dict[str, Any]:
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


def set_key(raw: dict[str, Any], dotted: str, value: object, source: str | None) -> None:
    section, key = dotted.split(".", 1)
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        where = f"{source}: " if source else ""
        raise ConfigError(
            f"invalid configuration:\n  {where}{section}: must be a table ([{section}])"
        )
    table[key] = value


def check_env_base_url(value: str) -> None:
    problem = base_url_problem(value)
    if problem is not None:
        shown = "" if "@" in value else f" (got {_shown(value)})"
        raise ConfigError(f"invalid configuration:\n  BEM_BASE_URL: {problem}{shown}")


def describe_validation_error(
    exc: msgspec.ValidationError, raw: Mapping[str, Any], schema: type, source: str | None
) -> str:
    """What is wrong with ``raw`` (the file's tables, flags and environment merged), which
    failed to convert to ``schema``; only the first problem is known."""
    return describe_problem(explain(exc, raw, schema), source)


def describe_problem(problem: Problem, source: str | None) -> str:
    """The ConfigError message for ``problem``: its key, what it must be, the value given."""
    where = f"{source}: " if source else ""
    key = problem.key
    if problem.unknown:
        return f"invalid configuration:\n  {where}unknown setting {key!r}"
    message = problem.message
    if problem.expected == "object":
        message = _table_hint(key)
    elif key == "route" and problem.expected == "array":
        message = "must be an array of tables: write each route as [[route]]"
    line = f"{where}{key}: {message}" if key else f"{where}{message}"
    if key and problem.value is not NOT_GIVEN and _may_show(key, problem.value):
        line += f" (got {_shown(problem.value)})"
    return f"invalid configuration:\n  {line}"


def _table_hint(key: str) -> str:
    section = key.partition(".")[0]
    table = f"[[{section}]]" if section == "route" else f"[{section}]"
    return f"must be a table ({table} in TOML)"


def _may_show(key: str, value: object) -> bool:
    """Values are shown to help, except a URL that may carry credentials."""
    if isinstance(value, dict):
        return False  # a whole table: the message says what is wrong in it
    if key == "store.url":
        return False  # a store URL may carry a password
    return not (key == "api.base_url" and isinstance(value, str) and "@" in value)


def _shown(value: object, limit: int = SHOWN_VALUE_CHARS) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
