"""Validation with msgspec, and its error told as a person reads it.

A struct checks what a type cannot say in its ``__post_init__`` and raises :class:`FieldProblem`
naming the field (msgspec reports such an error at the struct, not at the field).
:func:`explain` turns a :class:`msgspec.ValidationError` into a :class:`Problem`: the key
(``route.0.glob``), what is wrong in plain words (``must be >= 1``) and the value given, looked
up in the input by the error's path, since msgspec does not carry it. msgspec stops at the first
error, so there is one problem to tell.
"""

from __future__ import annotations

import math
import re
import sys
import typing
from typing import Annotated, Any, Final, Literal

import msgspec
import msgspec.structs

FINITE = sys.float_info.max
"""An upper bound that refuses infinity only (NaN fails every bound)."""
EXPECTED = "expected"
"""Key of a ``msgspec.Meta(extra=...)`` that words what a field takes, for its type errors."""


class FieldProblem(ValueError):
    """A value refused by a struct's own check; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class _NotGiven:
    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Final = _NotGiven()
"""The value of a :class:`Problem` whose key the input does not hold (a default was checked)."""


class Problem(msgspec.Struct, frozen=True):
    """The first thing wrong with an input."""

    key: str
    """Dotted: ``limits.burst``, ``route.0.glob``; empty for the input as a whole."""
    message: str
    """What is wrong, in words that follow the key: ``must be >= 1``."""
    value: object = NOT_GIVEN
    """What the input holds at ``key``, or :data:`NOT_GIVEN`."""
    unknown: bool = False
    """The key is not a field at all."""
    expected: str | None = None
    """msgspec's name of the type the key needs when it got another (``object``, ``array``)."""


_KINDS = {
    "int": "a whole number",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "object": "a table",
    "array": "an array",
}
_AT = " - at `"
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")
_WRONG_TYPE = re.compile(r"Expected `([^`]*)`, got `[^`]*`")
_BOUND = re.compile(r"Expected `\w+` (>=|<=|>|<) (\S+)")
_LENGTH = re.compile(r"Expected `str` of length (>=|<=) (\d+)")
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`", re.DOTALL)
_MISSING = re.compile(r"Object missing required field `(.*)`", re.DOTALL)


def explain(exc: msgspec.ValidationError, raw: object, schema: type) -> Problem:
    """What ``exc``, raised converting ``raw`` to ``schema``, says is wrong, and where."""
    text = str(exc)
    message, at, path = text.rpartition(_AT)
    if not at:
        message, path = text, "$`"
    steps: list[str | int] = [
        name if name else int(index) for name, index in _STEP.findall(path.removesuffix("`"))
    ]
    cause = exc.__cause__
    unknown = False
    expected = None
    if isinstance(cause, FieldProblem):
        steps.append(cause.field)
        message = cause.problem
    elif match := _UNKNOWN.fullmatch(message):
        steps.append(match.group(1))
        unknown = True
    elif match := _MISSING.fullmatch(message):
        steps.append(match.group(1))
        message = "is required"
    else:
        if match := _WRONG_TYPE.fullmatch(message):
            expected = match.group(1).removesuffix(" | null")
        message = _plain(message, _type_at(schema, steps), _value_at(raw, steps))
    key = ".".join(str(step) for step in steps)
    return Problem(key, message, _value_at(raw, steps), unknown, expected)


def _plain(message: str, kind: object, value: object) -> str:
    """msgspec's ``message`` about a field of type ``kind`` given ``value``, in plain words."""
    choices = _choices(kind)
    if isinstance(value, float) and not math.isfinite(value) and _BOUND.fullmatch(message):
        return "must be a finite number"
    if match := _WRONG_TYPE.fullmatch(message):
        if choices:
            return f"must be one of {choices}"
        worded = meta_extra(kind).get(EXPECTED)
        if worded:
            return f"must be {worded}"
        names = [name for name in match.group(1).split(" | ") if name != "null"]
        return "must be " + " or ".join(_KINDS.get(name, name) for name in names)
    if message.startswith("Invalid enum value") and choices:
        return f"must be one of {choices}"
    if match := _BOUND.fullmatch(message):
        operator, bound = match.groups()
        return f"must be {operator} {bound.removesuffix('.0')}"
    if match := _LENGTH.fullmatch(message):
        operator, length = match.groups()
        if operator == ">=":
            return "cannot be empty" if length == "1" else f"must be at least {length} characters"
        return f"must be at most {length} characters"
    if message == "Number out of range":
        highs = [item.le for item in _metas(kind) if item.le is not None]
        if highs and isinstance(value, int) and value > 0:
            return f"must be <= {_number(min(highs))}"
        return "is out of range"
    return message


def _number(bound: float) -> str:
    return repr(bound).removesuffix(".0")


def _value_at(raw: object, steps: list[str | int]) -> object:
    for step in steps:
        if isinstance(raw, list) and isinstance(step, int) and step < len(raw):
            raw = raw[step]
            continue
        if not (isinstance(raw, dict) and step in raw):
            return NOT_GIVEN
        raw = raw[step]
    return raw


def _type_at(schema: object, steps: list[str | int]) -> object:
    """The declared type at ``steps`` below ``schema`` (Annotated kept); None if there is none."""
    kind = schema
    for step in steps:
        bare = _bare(kind)
        if isinstance(step, str) and isinstance(bare, type) and issubclass(bare, msgspec.Struct):
            fields = {field.name: field.type for field in msgspec.structs.fields(bare)}
            if step not in fields:
                return None
            kind = fields[step]
        elif isinstance(step, int) and typing.get_origin(bare) in (tuple, list):
            kind = typing.get_args(bare)[0]
        else:
            return None
    return kind


def _bare(kind: object) -> object:
    """``kind`` without Annotated and without an optional None."""
    if typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if type(None) in typing.get_args(kind) and len(args) == 1:
        return _bare(args[0])
    return kind


def meta_extra(kind: object) -> dict[str, Any]:
    """The ``extra`` of the ``msgspec.Meta`` annotating ``kind``; empty if there is none."""
    extra: dict[str, Any] = {}
    for item in _metas(kind):
        extra.update(item.extra or {})
    return extra


def _metas(kind: object) -> list[msgspec.Meta]:
    if typing.get_origin(kind) is not Annotated:
        return []
    return [item for item in getattr(kind, "__metadata__", ()) if isinstance(item, msgspec.Meta)]


def _choices(kind: object) -> str:
    bare = _bare(kind)
    if typing.get_origin(bare) is not Literal:
        return ""
    return ", ".join(repr(choice) for choice in typing.get_args(bare))
