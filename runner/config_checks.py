"""Checks of configuration values: each says why a value cannot work, or None.

They are pure, except :func:`wrong_kind_of_path`, which looks at what already exists (and
creates nothing). None of them repeats a credential or a password a value may carry.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path

import httpx

from runner.store import is_postgres_url

URL_PATH_MAX = 256
"""Longest URL path the webhook receiver may listen on."""
PORT_MAX = 65_535
VISIBLE_ASCII = range(0x21, 0x7F)
"""Code points of the printable ASCII characters other than the space."""


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be bem's base URL; None if it can. Never repeats credentials."""
    if not url or not _visible_ascii(url):
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
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > PORT_MAX:
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


def overlapping_paths(*, inbox: Path, written: Mapping[str, Path], state: Path) -> str | None:
    """Why the configured folders cannot work together; None if they can.

    ``written`` are the folders the runner writes into, by key (``paths.outbox``, and
    ``paths.archive`` when inputs are archived). They must not be, or be inside, the folder it
    reads from (it would take its own documents as input), nor inside each other. The state
    database must not be in the inbox either.
    """
    folders = [("paths.inbox", inbox), *written.items()]
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
    if state.is_relative_to(inbox):
        return f"paths.state ({state}) is inside paths.inbox ({inbox}); keep it out of the inbox"
    for key, folder in written.items():
        if state == folder:
            return f"paths.state ({state}) is the folder {key}; it must be a file of its own"
    return None


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
    if len(path) > URL_PATH_MAX:
        return f"must be at most {URL_PATH_MAX} characters"
    if not _visible_ascii(path) or "?" in path or "#" in path:
        return "must be visible ASCII without a query (?) or a fragment (#)"
    return None


def wrong_kind_of_path(folders: Mapping[str, Path], state: Path) -> str | None:
    """Why a configured path that already exists cannot be used as what it is configured as.

    ``folders`` by key (``paths.inbox``, ...). Nothing is created here: a path that does not
    exist yet is fine (it is made when needed).
    """
    for key, folder in folders.items():
        if folder.exists() and not folder.is_dir():
            return f"{key} ({folder}) exists and is not a folder"
    if state.is_dir():
        return f"paths.state ({state}) is a folder; it must name the state database file"
    return None


def _visible_ascii(text: str) -> bool:
    return all(ord(char) in VISIBLE_ASCII for char in text)
