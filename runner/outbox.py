"""Outbox names (pure): where a file's result or error document goes.

A file's result goes to ``<outbox>/<rel>.json`` and its error to ``<outbox>/<rel>.error.json``,
``rel`` being its exact path in the inbox (bytes that are not UTF-8 included). When that
*natural* name cannot hold the document, the document goes to the file's *alternative* name,
the same on every attempt::

    <name cut to fit>~<hash>.json            <name cut to fit>~<hash>.error.json

``<hash>`` is the first 16 hex digits of the SHA-256 of ``rel``'s bytes, so two files never
share an alternative name. The name is shown as valid UTF-8 (a byte that is not UTF-8 becomes
``\\xNN``) and cut at a character boundary so that the whole fits the file system's NAME_MAX
(and the whole path stays under PATH_MAX). The alternative goes in the file's own folder when
that folder can hold it, else straight under the outbox root. Either way the document's
``"file"`` (and ``"fileBase64"``) names the input. The natural name is passed over when:

- a component of it is longer than NAME_MAX, or the whole path reaches PATH_MAX;
- it is the result of a file whose name ends in ``.error`` (``x.error.json`` is the error
  document of ``x``, so the result of ``x.error`` cannot be there too);
- writing it failed in a way that can never succeed (:func:`runner.file_ops.is_permanent`):
  a folder, a file or a symbolic link in the way.

A temporary file is ``.<name>.<token>.tmp`` beside its target, or ``.<name cut>~<hash>.<token>.tmp``
when that would be longer than NAME_MAX. ``<token>`` is the writing runner's (eight hex digits of
the SHA-256 of its id; all zeros for a store one process owns), so two runners writing the same
document never share a temporary: each renames a complete file of its own over the target.

The files themselves are written, replaced and removed by :mod:`runner.file_ops`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec

from runner import names

Kind = Literal["result", "error"]
KINDS: tuple[Kind, ...] = ("result", "error")
RESULT_SUFFIX = ".json"
ERROR_SUFFIX = ".error.json"
SUFFIXES: dict[Kind, str] = {"result": RESULT_SUFFIX, "error": ERROR_SUFFIX}
HASH_DIGITS = 16
TOKEN_DIGITS = 8
SINGLE_OWNER_TOKEN = "0" * TOKEN_DIGITS
"""The temporaries' token of the one process that owns its store (SQLite)."""
TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY = re.compile(rf"\A\..+\.([0-9a-f]{{{TOKEN_DIGITS}}})\.tmp\Z", re.DOTALL)
NAME_MAX = 255
PATH_MAX = 4096
"""Linux's usual limits, used until a folder's own are read (:meth:`Limits.of`)."""


# ---------------------------------------------------------------------------------------------
# Names (pure)


class Limits(msgspec.Struct, frozen=True):
    name_max: int = NAME_MAX
    path_max: int = PATH_MAX

    @classmethod
    def of(cls, folder_fd: int) -> Limits:
        return cls(os.fpathconf(folder_fd, "PC_NAME_MAX"), os.fpathconf(folder_fd, "PC_PATH_MAX"))


class Place(msgspec.Struct, frozen=True):
    """A name below a root: the folders that lead to it, then its own name."""

    folders: tuple[str, ...]
    name: str

    def path(self, root: Path) -> Path:
        return root.joinpath(*self.folders, self.name)


def size(text: str) -> int:
    """Length in bytes of a name as the file system sees it."""
    return len(text) if text.isascii() else len(names.raw(text))


def short_hash(text: str) -> str:
    return hashlib.sha256(names.raw(text)).hexdigest()[:HASH_DIGITS]


def cut(text: str, budget: int) -> str:
    """The longest start of ``text`` of at most ``budget`` bytes that ends between characters."""
    if size(text) <= budget:
        return text
    kept: list[str] = []
    used = 0
    for character in text:
        used += size(character)
        if used > budget:
            break
        kept.append(character)
    return "".join(kept)


def fits(root: Path, place: Place, limits: Limits) -> bool:
    """Whether every component fits NAME_MAX and the whole path stays under PATH_MAX."""
    parts = (*place.folders, place.name)
    if any(size(part) > limits.name_max for part in parts):
        return False
    total = _root_size(root) + sum(1 + size(part) for part in parts)
    return total < limits.path_max


def _root_size(root: Path) -> int:
    """The outbox root's absolute path in bytes."""
    return _absolute_size(root) if root.is_absolute() else size(os.path.abspath(root))


@functools.lru_cache(maxsize=16)
def _absolute_size(root: Path) -> int:
    # one root per runner, asked for every place of every document
    return size(os.path.abspath(root))


def natural_place(rel: str, kind: Kind) -> Place:
    *folders, name = rel.split("/")
    return Place(tuple(folders), name + SUFFIXES[kind])


def alternative_name(rel: str, kind: Kind, room: int) -> str | None:
    """``<name cut>~<hash><suffix>`` in at most ``room`` bytes; None when even that is too long.

    Always valid UTF-8 (the name as :func:`names.shown` gives it), so that a file system that
    refuses other bytes still takes it; the hash keeps the exact bytes apart.
    """
    tail = f"~{short_hash(rel)}{SUFFIXES[kind]}"
    budget = room - size(tail)
    if budget < 1:
        return None
    return cut(names.shown(rel.rsplit("/", 1)[-1]), budget) + tail


def room(root: Path, folders: Sequence[str], limits: Limits) -> int:
    """The longest name that fits in this folder (NAME_MAX, and the path under PATH_MAX)."""
    used = _root_size(root) + sum(1 + size(part) for part in folders) + 1
    return min(limits.name_max, limits.path_max - 1 - used)


def claims_natural(rel: str, kind: Kind) -> bool:
    """Whether the natural name belongs to this document (see the module's docstring)."""
    return not (kind == "result" and rel.endswith(ERROR_SUFFIX.removesuffix(RESULT_SUFFIX)))


def document_places(root: Path, rel: str, kind: Kind, limits: Limits) -> list[Place]:
    """Where a document of this kind may go, best first; each fits the file system."""
    natural = natural_place(rel, kind)
    candidates = [natural] if claims_natural(rel, kind) else []
    for folders in (natural.folders, ()):
        alternative = alternative_name(rel, kind, room(root, folders, limits))
        if alternative is not None:
            candidates.append(Place(folders, alternative))
    return [p for p in dict.fromkeys(candidates) if fits(root, p, limits)]


def runner_token(runner_id: str | None) -> str:
    """The token in a runner's temporaries; ``None`` is the one owner of a SQLite store."""
    if runner_id is None:
        return SINGLE_OWNER_TOKEN
    return hashlib.sha256(runner_id.encode()).hexdigest()[:TOKEN_DIGITS]


def temporary_name(name: str, name_max: int, token: str = SINGLE_OWNER_TOKEN) -> str:
    """The temporary of one runner beside ``name``: fits whenever ``name`` does, and depends
    only on the two (a runner's own leftover is replaced by its next write of ``name``)."""
    plain = f".{name}.{token}{TEMPORARY_SUFFIX}"
    if size(plain) <= name_max:
        return plain
    tail = f"~{short_hash(name)}.{token}{TEMPORARY_SUFFIX}"
    return "." + cut(name, name_max - 1 - size(tail)) + tail


def temporary_token(name: str) -> str | None:
    """The runner token of a temporary's name; None for any other name."""
    match = _TEMPORARY.match(name)
    return match.group(1) if match else None


def shown_place(root: Path, place: Place) -> str:
    return names.shown(str(place.path(root)))
