"""Where a PostgreSQL store is, how to log in, and how to name it without its password.

A password comes from the URL, ``PGPASSWORD`` or ``PGPASSFILE`` (libpq reads those itself), else
``$CREDENTIALS_DIRECTORY/store-password`` (systemd ``LoadCredential=``). It appears in no
message: the URL is shown without it (:func:`shown_url`) and every error text is scrubbed of it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict

from runner.errors import StoreError

PASSWORD_CREDENTIAL = "store-password"
"""The file under ``$CREDENTIALS_DIRECTORY`` that holds the store's password."""
CONNECT_TIMEOUT_SECONDS = 10


class Target(msgspec.Struct, frozen=True):
    """A parsed store URL: what to connect with, and how to name it in messages."""

    conninfo: str
    shown: str
    password: str | None
    """Given here only when libpq would not find it itself (the credentials directory)."""
    secrets: tuple[str, ...]
    """Every password that may reach an error message, to scrub."""

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str]) -> Target:
        secrets = [s for s in (environ.get("PGPASSWORD"),) if s]
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"the store URL is not a valid PostgreSQL URL: {exc}") from None
        in_url = params.get("password")
        if in_url:
            secrets.append(str(in_url))
        password = None
        if not in_url and not environ.get("PGPASSWORD"):
            password = _credential_password(environ)
            if password:
                secrets.append(password)
        return cls(url, shown_url(params), password, tuple(secrets))

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def shown_url(params: Mapping[str, Any]) -> str:
    """The URL as messages show it: user, host, port and database, never a password."""
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or "")
    if "/" in host:  # a socket directory
        host = f"[{host}]"
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _credential_password(environ: Mapping[str, str]) -> str | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / PASSWORD_CREDENTIAL
    try:
        return path.read_text(encoding="utf-8").strip("\r\n") or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read the store password from {path}: {exc}") from None


def connect_kwargs(target: Target) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "application_name": f"bem-runner {socket.gethostname()} pid {os.getpid()}"[:63],
    }
    if target.password is not None:
        kwargs["password"] = target.password
    return kwargs
