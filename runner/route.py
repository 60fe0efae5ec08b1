"""Where an inbox file goes: which workflow, which call (group) and which ``inputType``.

Paths are relative to the inbox, POSIX style. Route globs are matched against the whole path,
gitignore style: ``*`` and ``?`` stay within one path component, ``[...]`` is a character class
(``[!...]`` or ``[^...]`` negated), ``**`` as a whole component spans any number of components
(zero included), a trailing ``/`` is short for ``/**``, and ``\\`` escapes the next character.
A glob without ``/`` is anchored too: ``*.pdf`` matches files at the top only, ``**/*.pdf`` any.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Annotated, Literal, get_args

import msgspec

from runner.names import shown
from runner.validation import FieldProblem

INPUT_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "csv": "csv",
        "docx": "docx",
        "eml": "email",
        "heic": "heic",
        "heif": "heif",
        "htm": "html",
        "html": "html",
        "jfif": "jpeg",
        "jpeg": "jpeg",
        "jpg": "jpeg",
        "json": "json",
        "m4a": "m4a",
        "mov": "mov",
        "mp3": "mp3",
        "mp4": "mp4",
        "pdf": "pdf",
        "png": "png",
        "pptx": "pptx",
        "txt": "text",
        "wav": "wav",
        "webp": "webp",
        "xls": "xls",
        "xlsx": "xlsx",
        "xml": "xml",
    }
)
"""File extension (lowercase, no dot) -> bem ``inputType``."""

_IGNORED_SUFFIXES = (".tmp", ".part", ".crdownload")
_NOTHING = "(?!)"  # the regex of a character class that matches no character

GroupMode = Literal["file", "folder", "window"]
GROUP_MODES: frozenset[str] = frozenset(get_args(GroupMode))


MAX_BATCH_FILES = 10_000
MAX_BATCH_BYTES = 10_000_000_000
MAX_BATCH_WINDOW_SECONDS = 86_400.0


class Route(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One ``[[route]]`` of the config: files matching ``glob`` go to ``workflow``.

    The one definition of a valid route: the config validates its ``[[route]]`` tables as this
    struct, so a route that loads can be used as it is. Numbers are strict (no booleans, no
    strings) and bounded; a glob must be able to match a file the runner takes.
    """

    glob: str
    workflow: str
    group: GroupMode = "file"
    batch_max_files: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH_FILES)] = 50
    batch_max_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH_BYTES)] = 50_000_000
    batch_window_seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_BATCH_WINDOW_SECONDS)] = 10.0

    def __post_init__(self) -> None:
        problem = glob_problem(self.glob)
        if problem is not None:
            raise FieldProblem("glob", problem)
        problem = workflow_name_problem(self.workflow)
        if problem is not None:
            raise FieldProblem("workflow", problem)


def workflow_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a workflow name in ``/v3/workflows/{name}/call``; None if it can."""
    if not name.strip():
        return "the workflow name cannot be empty"
    if name in (".", ".."):
        return f"the workflow name cannot be {name!r} (it would change the request's path)"
    if "/" in name:
        return "the workflow name cannot contain '/'"
    for position, char in enumerate(name):
        if unicodedata.category(char) in ("Cc", "Cs"):
            return (
                f"the workflow name contains a control character (U+{ord(char):04X}) "
                f"at position {position}"
            )
    return None


def glob_problem(glob: str) -> str | None:
    """Why a route glob can never match a file the runner takes; None if it can."""
    if "\x00" in glob:
        return "a route glob cannot contain NUL: no file name does"
    try:
        components = _glob_components(glob)
        pattern, _ = _compile_glob(glob)
    except ValueError as exc:
        return str(exc)
    for component in components:
        if component == "**":
            continue
        literal = _literal_text(component)
        if literal in (".", "..") and _translate_component(component)[1]:
            return f"a route glob cannot have a {literal!r} component: no inbox path has one"
        if literal.startswith("."):
            return f"route glob component {component!r} matches only hidden files, never taken"
        if component.lower().endswith(_IGNORED_SUFFIXES):
            return f"route glob component {component!r} matches only files that are never taken"
    if _NOTHING in pattern.pattern:
        return f"route glob {glob!r} has a character class that matches nothing"
    return None


class Destination(msgspec.Struct, frozen=True):
    """Where one file goes.

    ``batch_key`` names the call the file belongs to: the file's own path (mode "file"), the
    folder that becomes one batch (mode "folder"), or ``window:<route index>`` (mode "window").
    ``item_reference_id`` names the file inside that call: its name (mode "file"), its path
    inside the folder (mode "folder"), or its path in the inbox (mode "window") — as
    :func:`runner.names.shown`, since bem takes only valid Unicode.
    """

    workflow: str
    mode: GroupMode
    batch_key: str
    item_reference_id: str


def input_type_for(rel: PurePosixPath) -> str | None:
    """The bem ``inputType`` for a file, from its extension; None if bem does not take it."""
    return INPUT_TYPES.get(rel.suffix.lower().removeprefix("."))


def is_ignored(rel: PurePosixPath) -> bool:
    """Files the runner never takes: anything hidden (the ``.ready`` marker included) or
    anything named like a download or copy still in progress."""
    return any(
        part.startswith(".") or part.lower().endswith(_IGNORED_SUFFIXES) for part in rel.parts
    )


def glob_matches(glob: str, rel: PurePosixPath | str) -> bool:
    """Whether a route glob matches a path relative to the inbox."""
    pattern, _ = _compile_glob(glob)
    text = rel.as_posix() if isinstance(rel, PurePosixPath) else rel
    return pattern.fullmatch(text) is not None


def route_file(rel: PurePosixPath, routes: Sequence[Route]) -> Destination | None:
    """Where ``rel`` goes: the first matching route, or the default layout when there are no
    routes. None when nothing applies (a file at the inbox root by default, or no route
    matches)."""
    _check_relative(rel)
    if not routes:
        return _default_destination(rel)
    text = rel.as_posix()
    for index, route in enumerate(routes):
        pattern, literal_prefix = _compile_glob(route.glob)
        if pattern.fullmatch(text):
            return _routed_destination(rel, route, index, literal_prefix)
    return None


def _check_relative(rel: PurePosixPath) -> None:
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise ValueError(f"not a file path inside the inbox: {rel.as_posix()!r}")


def _default_destination(rel: PurePosixPath) -> Destination | None:
    """``<workflow>/<file>`` is one call; ``<workflow>/<folder>/...`` is one batch per folder."""
    parts = rel.parts
    if len(parts) < 2:
        return None
    if len(parts) == 2:
        return Destination(parts[0], "file", rel.as_posix(), shown(rel.name))
    return Destination(parts[0], "folder", "/".join(parts[:2]), shown("/".join(parts[2:])))


def _routed_destination(
    rel: PurePosixPath, route: Route, index: int, literal_prefix: int
) -> Destination:
    parts = rel.parts
    if route.group == "window":
        return Destination(route.workflow, "window", f"window:{index}", shown(rel.as_posix()))
    # The batch folder is the first directory below the glob's literal prefix; a file directly
    # in the prefix folder has no batch folder and is sent on its own.
    group_depth = literal_prefix + 1
    if route.group == "folder" and len(parts) > group_depth:
        return Destination(
            route.workflow,
            "folder",
            "/".join(parts[:group_depth]),
            shown("/".join(parts[group_depth:])),
        )
    return Destination(route.workflow, "file", rel.as_posix(), shown(rel.name))


# -- glob compiler ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _compile_glob(glob: str) -> tuple[re.Pattern[str], int]:
    """The regular expression for a glob, and how many leading components are literal."""
    components = _glob_components(glob)
    regex: list[str] = []
    literal_prefix = 0
    counting_prefix = True
    separator = ""  # what joins the next component to the ones before it
    for position, component in enumerate(components):
        last = position == len(components) - 1
        if component == "**":
            counting_prefix = False
            if position == 0:
                regex.append(".+" if last else "(?:[^/]+/)*")
            else:
                regex.append("(?:/.+)?" if last else "/(?:[^/]+/)*")
            separator = ""
            continue
        translated, literal = _translate_component(component)
        counting_prefix = counting_prefix and literal
        literal_prefix += int(counting_prefix)
        regex.append(separator + translated)
        separator = "/"
    return re.compile("".join(regex)), literal_prefix


def _glob_components(glob: str) -> list[str]:
    text = glob.lstrip("/")
    if text.endswith("/"):
        text += "**"
    components: list[str] = []
    for component in text.split("/"):
        if not component or (component == "**" and components[-1:] == ["**"]):
            continue
        components.append(component)
    if not components:
        raise ValueError(f"a route glob cannot be empty: {glob!r}")
    return components


def _translate_component(component: str) -> tuple[str, bool]:
    """Regex for one path component (no ``/`` inside), and whether it has no wildcard."""
    out: list[str] = []
    literal = True
    i, n = 0, len(component)
    while i < n:
        char = component[i]
        i += 1
        if char == "*":
            while i < n and component[i] == "*":
                i += 1
            out.append("[^/]*")
            literal = False
        elif char == "?":
            out.append("[^/]")
            literal = False
        elif char == "\\" and i < n:
            out.append(re.escape(component[i]))
            i += 1
        elif char == "[" and (end := _class_end(component, i)) is not None:
            out.append(_translate_class(component[i:end]))
            i = end + 1
            literal = False
        else:
            out.append(re.escape(char))
    return "".join(out), literal


def _literal_text(component: str) -> str:
    """The characters a component starts with for certain: up to its first wildcard, unescaped."""
    out: list[str] = []
    i = 0
    while i < len(component) and component[i] not in "*?[":
        if component[i] == "\\" and i + 1 < len(component):
            i += 1
        out.append(component[i])
        i += 1
    return "".join(out)


def _class_end(component: str, start: int) -> int | None:
    """Index of the ``]`` closing a class whose body starts at ``start``, if there is one."""
    j = start
    if j < len(component) and component[j] in "!^":
        j += 1
    if j < len(component) and component[j] == "]":
        j += 1  # a leading "]" is part of the class
    end = component.find("]", j)
    return None if end < 0 else end


def _translate_class(body: str) -> str:
    negated = body[:1] in ("!", "^")
    if negated:
        body = body[1:]
    items: list[str] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            low, high = body[k], body[k + 2]
            if low <= high:  # a reversed range matches nothing
                items.append(f"{re.escape(low)}-{re.escape(high)}")
            k += 3
        else:
            items.append(re.escape(body[k]))
            k += 1
    if negated:
        return "[^/" + "".join(items) + "]"
    return "[" + "".join(items) + "]" if items else _NOTHING
