"""What stands in front of every API route: auth, rate limit, fault injection, request counting.

For each API request (everything outside ``/_emulator/``), in this order:

1. a missing or wrong ``x-api-key`` is answered 401;
2. an empty token bucket is answered 429 with ``Retry-After`` (nothing else happens);
3. ``error_5xx_rate``: answered 500/502/503 without running the handler;
4. otherwise the handler runs and its response is held back, then
   ``accept_then_500_rate`` swaps a successful POST response for a 500 (the work is done),
   ``slow_rate`` delays the response by ``slow_seconds`` of emulator time, and
   ``drop_rate`` sends half of the response and drops the connection (see ``faults``).

Every request is counted under "<METHOD> <route template>" with the status the client got,
or "dropped".
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.emulator.faults import ConnectionDropped, announced_seconds, retry_after

if TYPE_CHECKING:
    from runner.emulator.emulator import Emulator

CONTROL_PREFIX = "/_emulator/"
UNMATCHED_ROUTE = "<unmatched>"


def error_response(
    status_code: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


@dataclass
class _HeldResponse:
    status: int = 0
    start: Message = field(default_factory=dict)
    body: bytes = b""

    async def collect(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = dict(message)
            self.status = int(message["status"])
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def replay(self, send: Send) -> None:
        await send(self.start)
        await send({"type": "http.response.body", "body": self.body, "more_body": False})

    async def replay_half_then_drop(self, send: Send) -> None:
        await send(self.start)
        await send(
            {
                "type": "http.response.body",
                "body": self.body[: len(self.body) // 2],
                "more_body": True,
            }
        )
        raise ConnectionDropped()


class Gate:
    def __init__(self, app: ASGIApp, emulator: Emulator, routes: Sequence[BaseRoute]) -> None:
        self._app = app
        self._emulator = emulator
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(CONTROL_PREFIX):
            await self._app(scope, receive, send)
            return
        route = f"{scope['method']} {self._route_template(scope)}"
        refusal = self._refusal(scope)
        if refusal is not None:
            self._emulator.counters.record_request(route, refusal.status_code)
            await refusal(scope, receive, send)
            return
        await self._run_with_faults(scope, receive, send, route)

    def _refusal(self, scope: Scope) -> Response | None:
        settings = self._emulator.settings
        given = Headers(scope=scope).get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            return error_response(401, "missing or invalid API key (x-api-key header)")
        now = self._emulator.time.now()
        self._emulator.counters.record_arrival(now)
        wait = self._emulator.take_token()
        if wait > 0:
            wall = time.time()
            value = retry_after(wait, settings.retry_after_format, wall)
            self._emulator.counters.record_rate_limited(
                now=now, retry_after_seconds=announced_seconds(value, wall)
            )
            return error_response(429, "rate limit exceeded", headers={"Retry-After": value})
        return None

    async def _run_with_faults(
        self, scope: Scope, receive: Receive, send: Send, route: str
    ) -> None:
        counters = self._emulator.counters
        plan = self._emulator.plan_faults(creates=scope["method"] == "POST")
        if plan.error_status is not None:
            counters.record_fault("error_5xx")
            counters.record_request(route, plan.error_status)
            await error_response(plan.error_status, "emulated server error")(scope, receive, send)
            return
        held = _HeldResponse()
        await self._app(scope, receive, held.collect)
        if plan.accept_then_500 and held.status < 300:
            counters.record_fault("accept_then_500")
            held = _HeldResponse()
            await error_response(500, "emulated server error after accepting the request")(
                scope, receive, held.collect
            )
        counters.record_request(route, "dropped" if plan.drop else held.status)
        if plan.slow:
            counters.record_fault("slow")
            await self._emulator.sleep(self._emulator.settings.slow_seconds)
        if plan.drop:
            counters.record_fault("dropped")
            await held.replay_half_then_drop(send)
        await held.replay(send)

    def _route_template(self, scope: Scope) -> str:
        partial = None
        for candidate in self._routes:
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                return str(getattr(candidate, "path", UNMATCHED_ROUTE))
            if match == Match.PARTIAL and partial is None:
                partial = str(getattr(candidate, "path", UNMATCHED_ROUTE))
        return partial or UNMATCHED_ROUTE
