"""Inbox names as the runner carries them: any name the file system allows.

Linux file names are bytes. Inside the runner a path is a ``str`` made by :func:`os.fsdecode`:
bytes that are not UTF-8 become lone surrogates (PEP 383), so :func:`raw` gives back the exact
bytes and every file-system call on the ``str`` reaches the same file. Where a name must be
valid Unicode — JSON documents, log lines, bem's ``itemReferenceID`` — it is :func:`shown`: the
name as it is when it is valid UTF-8, else with each byte that is not UTF-8 written ``\\xNN``.
Documents then also carry the exact bytes (:func:`name_fields`).
"""

from __future__ import annotations

import base64
import os

__all__ = ["from_raw", "is_exact", "name_fields", "raw", "shown"]


def raw(name: str) -> bytes:
    """The exact bytes of a name made by :func:`os.fsdecode` (or of any ``str``)."""
    return os.fsencode(name)


def from_raw(data: bytes) -> str:
    """The runner's ``str`` for a name given as bytes; ``raw(from_raw(b)) == b``."""
    return os.fsdecode(data)


def is_exact(name: str) -> bool:
    """Whether the name is valid Unicode as it is (its bytes were UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """The name as valid Unicode: unchanged when it can be, else non-UTF-8 bytes as ``\\xNN``."""
    if is_exact(name):
        return name
    return raw(name).decode("utf-8", "backslashreplace")


def name_fields(key: str, name: str) -> dict[str, str]:
    """``{key: shown(name)}``, plus ``{key}Base64`` with the exact bytes when they differ."""
    fields = {key: shown(name)}
    if not is_exact(name):
        fields[f"{key}Base64"] = base64.b64encode(raw(name)).decode("ascii")
    return fields
