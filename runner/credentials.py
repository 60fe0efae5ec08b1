"""Secrets from the environment or files, checked once at load and never shown.

Every secret the runner resolves (the API key today; a webhook secret or a store password
tomorrow) goes through :func:`resolve_secret`: the environment variable, else a configured file,
else systemd's ``$CREDENTIALS_DIRECTORY/<name>``. A secret travels in an HTTP header, so it must
be visible ASCII (0x21–0x7E) after surrounding whitespace (a key file's trailing newline, CRLF
too) is stripped. A bad one is a :class:`ConfigError` that says where it came from and what is
wrong with it, never what it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

import msgspec

from runner.errors import ConfigError

MAX_SECRET_CHARS = 4096
_SURROUNDING_WHITESPACE = " \t\r\n\v\f"
_FIRST_VISIBLE, _LAST_VISIBLE = 0x21, 0x7E
_HIDDEN: Final = "**********"


class Secret:
    """A secret string: handed over by :meth:`get_secret_value`, never shown by repr or str."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_HIDDEN!r})"

    def __str__(self) -> str:
        return _HIDDEN

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self._value == other._value

    def __hash__(self) -> int:
        return hash(self._value)


class SecretSource(msgspec.Struct, frozen=True):
    """Where one secret may come from, in order of precedence."""

    what: str
    """What it is, for messages: "API key"."""
    env_var: str
    """The environment variable, e.g. ``BEM_API_KEY``; an empty value counts as unset."""
    file_key: str
    """The config key naming a file that holds it, e.g. ``api.api_key_file``."""
    credential: str
    """The file name under ``$CREDENTIALS_DIRECTORY``, e.g. ``api-key``."""


def resolve_secret(
    source: SecretSource, *, environ: Mapping[str, str], file: Path | None
) -> Secret | None:
    """The secret from the first place that has one; None if none does."""
    value = environ.get(source.env_var)
    if value:
        return Secret(_checked(value, source.env_var))
    if file is not None:
        return _from_file(file, f"{source.what} file {file} ({source.file_key})")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = Path(credentials) / source.credential
        if path.exists():
            where = f"{source.what} file $CREDENTIALS_DIRECTORY/{source.credential} ({path})"
            return _from_file(path, where)
    return None


def secret_problem(text: str) -> str | None:
    """What makes ``text`` (already stripped) unfit for an HTTP header; None if nothing.

    Says what kind of character is wrong and where, never the character itself beyond its
    class (a control character's code point is shown: it is not part of any real secret).
    """
    if not text:
        return "is empty (or only whitespace)"
    if len(text) > MAX_SECRET_CHARS:
        return f"is longer than {MAX_SECRET_CHARS} characters"
    for position, char in enumerate(text):
        code = ord(char)
        if _FIRST_VISIBLE <= code <= _LAST_VISIBLE:
            continue
        if code == 0x20:
            kind = "a space (U+0020)"
        elif code < 0x20 or code == 0x7F:
            kind = f"a control character (U+{code:04X})"
        else:
            kind = "a non-ASCII character"
        return (
            f"contains {kind} at position {position}; only visible ASCII characters "
            "(0x21-0x7E) can be sent in a header"
        )
    return None


def _checked(raw: str, where: str) -> str:
    text = raw.strip(_SURROUNDING_WHITESPACE)
    problem = secret_problem(text)
    if problem is not None:
        raise ConfigError(f"{where} {problem}")
    return text


def _from_file(path: Path, where: str) -> Secret:
    try:
        with path.open("rb") as fh:
            data = fh.read(4 * MAX_SECRET_CHARS + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # e.g. a NUL in the path
        raise ConfigError(f"cannot read {where}: {exc}") from exc
    if len(data) > 4 * MAX_SECRET_CHARS:
        raise ConfigError(f"{where} is longer than {MAX_SECRET_CHARS} characters")
    for position, byte in enumerate(data):
        if byte >= 0x80:
            raise ConfigError(
                f"{where} contains a non-ASCII byte at position {position}; only visible ASCII "
                "characters (0x21-0x7E) can be sent in a header"
            )
    return Secret(_checked(data.decode("ascii"), where))
