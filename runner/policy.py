"""Timing decisions as pure functions: poll and retry delays, durations, unknown outcomes.

Attempts count from 0: ``attempt=0`` is the delay before the first repeat.
"""

from __future__ import annotations

import math
import random
import re
from typing import Literal

_MAX_EXPONENT = 1023  # 2.0**1024 overflows; the cap is reached long before

_UNIT_SECONDS: dict[str, float] = {
    "w": 7 * 86400.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}
_UNIT_ORDER = list(_UNIT_SECONDS)  # largest first
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(rf"{_NUMBER}")
_PART = re.compile(rf"\s*({_NUMBER})\s*([a-z]+)\s*")


def poll_delay(attempt: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Delay before poll number ``attempt + 1``: ``initial`` doubling up to ``maximum``.

    "Equal jitter": half of the exponential step is fixed, half is random, so consecutive polls
    of many calls spread out while each delay stays in ``[initial / 2, maximum]``.
    """
    _check_attempt(attempt)
    if not (initial > 0 and math.isfinite(initial)):
        raise ValueError(f"initial poll delay must be a positive number, not {initial!r}")
    if not (maximum >= initial and math.isfinite(maximum)):
        raise ValueError(f"maximum poll delay {maximum!r} must be at least initial {initial!r}")
    step = _exponential(initial, maximum, attempt)
    half = step / 2
    return min(maximum, half + half * rng.random())


def retry_delay(
    attempt: int,
    *,
    base: float = 0.5,
    maximum: float = 30.0,
    rng: random.Random,
    retry_after: float | None = None,
) -> float:
    """Delay before retry number ``attempt + 1`` of a failed request.

    "Full jitter" (uniform between 0 and ``base * 2**attempt``, capped at ``maximum``), but never
    sooner than the server's ``Retry-After``, which is honoured however long it is.
    """
    _check_attempt(attempt)
    if not (base > 0 and math.isfinite(base)):
        raise ValueError(f"retry base delay must be a positive number, not {base!r}")
    if not (maximum >= base and math.isfinite(maximum)):
        raise ValueError(f"maximum retry delay {maximum!r} must be at least base {base!r}")
    jittered = _exponential(base, maximum, attempt) * rng.random()
    if retry_after is None:
        return jittered
    if not math.isfinite(retry_after):
        raise ValueError(f"Retry-After must be a finite number of seconds, not {retry_after!r}")
    return max(retry_after, jittered)


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration: ``45``, ``"45"``, ``"30s"``, ``"90m"``, ``"1h30m"``, ``"1.5d"``.

    Units are ``w``, ``d``, ``h``, ``m``, ``s`` and ``ms``, each at most once, largest first.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"a duration must be a number of seconds or a string, not {text!r}")
    if isinstance(text, int | float):
        return _checked_seconds(float(text), text)
    spec = text.strip().lower()
    if not spec:
        raise ValueError("a duration cannot be empty; write e.g. '30s', '90m', '24h' or '1h30m'")
    if spec.startswith("-"):
        raise ValueError(f"a duration cannot be negative: {text!r}")
    if _PLAIN_NUMBER.fullmatch(spec):
        return _checked_seconds(float(spec), text)
    return _checked_seconds(_sum_parts(spec, text), text)


def unknown_outcome_resolution(
    *, now: float, sent_at: float, visibility_window: float, found: bool
) -> Literal["adopt", "wait", "resend"]:
    """What to do about a submission whose outcome is unknown, after looking it up.

    A call found by its reference ID is adopted. Not finding it proves nothing until the listing
    has had ``visibility_window`` seconds to show calls created at ``sent_at``; only then is it
    safe to send again.
    """
    if found:
        return "adopt"
    if now - sent_at < visibility_window:
        return "wait"
    return "resend"


def _exponential(start: float, cap: float, attempt: int) -> float:
    return min(cap, start * 2.0 ** min(attempt, _MAX_EXPONENT))


def _check_attempt(attempt: int) -> None:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise ValueError(f"attempt must be a whole number >= 0, not {attempt!r}")


def _sum_parts(spec: str, original: str) -> float:
    total = 0.0
    position = 0
    previous_rank = -1
    while position < len(spec):
        match = _PART.match(spec, position)
        if match is None:
            raise ValueError(_bad_duration(original))
        number, unit = match.groups()
        if unit not in _UNIT_SECONDS:
            raise ValueError(
                f"{_bad_duration(original)}: unknown unit {unit!r} (use {', '.join(_UNIT_ORDER)})"
            )
        rank = _UNIT_ORDER.index(unit)
        if rank <= previous_rank:
            raise ValueError(
                f"{_bad_duration(original)}: units must appear once each, largest first"
            )
        previous_rank = rank
        total += float(number) * _UNIT_SECONDS[unit]
        position = match.end()
    return total


def _checked_seconds(seconds: float, original: object) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite, not {original!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {original!r}")
    return seconds


def _bad_duration(original: str) -> str:
    return (
        f"invalid duration {original!r}: write a number of seconds or number+unit parts "
        "such as '30s', '90m', '24h', '1h30m' or '1.5d'"
    )
