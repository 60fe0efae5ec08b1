"""Fault injection: the token bucket, seeded dice, ``Retry-After`` values and dropped connections.

A dropped connection is emulated by starting the response, sending part of the body and then
raising :class:`ConnectionDropped`:

- over real HTTP, :func:`runner.emulator.server.serve_emulator` catches it and returns, so
  uvicorn closes the socket mid-body and the client sees the connection close before the
  announced ``Content-Length`` arrived (``httpx.RemoteProtocolError``);
- through ``httpx.ASGITransport`` the exception reaches the client as it is, and because it is
  an ``httpx.RemoteProtocolError`` the client handles it like any transport error.
"""

from __future__ import annotations

import math
import random
from email.utils import formatdate, parsedate_to_datetime
from typing import Literal

import httpx
import msgspec

from runner.emulator.settings import EmulatorSettings

SERVER_ERROR_STATUSES = (500, 502, 503)


class ConnectionDropped(httpx.RemoteProtocolError):
    """The emulator dropped the connection in the middle of the response, on purpose."""

    def __init__(self) -> None:
        super().__init__("the emulator dropped the connection mid-response (drop_rate)")


class TokenBucket:
    """``rate`` tokens per second of emulator time, at most ``burst``; starts full."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float) -> float:
        """Take one token: 0 when granted, else the seconds until one will be available."""
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self._burst), self._tokens + elapsed * self._rate)
        self._updated = max(self._updated, now)
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._rate


RetryAfterFormat = Literal["seconds", "http-date", "milliseconds"]


def retry_after(wait: float, style: RetryAfterFormat, wall_now: float) -> dict[str, str]:
    """The header announcing a wait never shorter than ``wait`` seconds from ``wall_now``:
    ``Retry-After`` (whole seconds or an HTTP date) or ``retry-after-ms``."""
    if style == "seconds":
        return {"Retry-After": str(max(1, math.ceil(wait)))}
    if style == "milliseconds":
        return {"retry-after-ms": str(max(1, math.ceil(wait * 1000)))}
    return {"Retry-After": formatdate(math.ceil(wall_now + wait), usegmt=True)}


def announced_seconds(headers: dict[str, str], wall_now: float) -> float:
    """How long headers made by :func:`retry_after` at ``wall_now`` ask to wait."""
    if "retry-after-ms" in headers:
        return int(headers["retry-after-ms"]) / 1000
    value = headers["Retry-After"]
    if value.isdigit():
        return float(value)
    return parsedate_to_datetime(value).timestamp() - wall_now


class FaultPlan(msgspec.Struct, frozen=True):
    """What goes wrong with one request that was let through."""

    error_status: int | None = None
    slow: bool = False
    accept_then_500: bool = False
    drop: bool = False


class FaultDice:
    """One seeded random stream per fault kind: enabling one fault leaves the others unchanged."""

    def __init__(self, seed: int) -> None:
        self._streams = {
            kind: random.Random(f"{seed}:{kind}")
            for kind in ("error_5xx", "error", "slow", "accept_then_500", "drop")
        }

    def plan(self, settings: EmulatorSettings, *, creates: bool) -> FaultPlan:
        """Roll for one request; ``creates``: the request may create calls (a POST)."""
        if self._roll("error_5xx", settings.error_5xx_rate):
            return FaultPlan(error_status=self._streams["error_5xx"].choice(SERVER_ERROR_STATUSES))
        if self._roll("error", settings.error_rate):
            return FaultPlan(error_status=settings.error_status)
        return FaultPlan(
            slow=self._roll("slow", settings.slow_rate),
            accept_then_500=creates
            and self._roll("accept_then_500", settings.accept_then_500_rate),
            drop=self._roll("drop", settings.drop_rate),
        )

    def _roll(self, kind: str, rate: float) -> bool:
        return rate > 0 and self._streams[kind].random() < rate
