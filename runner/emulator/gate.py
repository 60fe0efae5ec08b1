"""What stands in front of every API route: auth, rate limit, fault injection, request counting.

For each API request (everything outside ``/_emulator/``), in this order:

0. ``redirect_status``: answered with that redirect to the same path and query under
   ``/moved``; a request under ``/moved`` is served as if the prefix were not there;
1. a missing or wrong ``x-api-key`` is answered 401;
2. an empty token bucket is answered 429 with ``Retry-After`` (nothing else happens);
3. ``error_5xx_rate``: answered 500/502/503 without running the handler; ``error_rate``:
   answered ``error_status`` the same way;
4. otherwise the handler runs and its response is held back, then
   ``accept_then_500_rate`` swaps a successful POST response for a 500 (the work is done),
   ``slow_rate`` delays the response by ``slow_seconds`` of emulator time, and
   ``drop_rate`` sends half of the response and drops the connection (see ``faults``).

Every emulated error answer (2, 3 and ``accept_then_500``) carries ``x-should-retry`` when
``should_retry_header`` is set; those of 3 and ``accept_then_500`` announce a wait of
``fault_retry_after`` when it is set, in ``retry_after_format``.

Every request is counted under "<METHOD> <route template>" with the status the client got,
or "dropped".
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Protocol

import msgspec
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.emulator.clock import Timekeeper
from runner.emulator.faults import ConnectionDropped, FaultPlan, announced_seconds, retry_after
from runner.emulator.settings import EmulatorSettings
from runner.emulator.stats import Stats

CONTROL_PREFIX = "/_emulator/"
MOVED_PREFIX = "/moved"
UNMATCHED_ROUTE = "<unmatched>"


def error_response(
    status_code: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


class _HeldResponse(msgspec.Struct):
    status: int = 0
    start: Message = msgspec.field(default_factory=dict)
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


class EmulatorForGate(Protocol):
    """What the gate reads and counts; read on every request, as settings and counters change."""

    @property
    def settings(self) -> EmulatorSettings: ...
    @property
    def time(self) -> Timekeeper: ...
    @property
    def counters(self) -> Stats: ...
    def take_token(self) -> float: ...
    def plan_faults(self, *, creates: bool) -> FaultPlan: ...
    async def sleep(self, seconds: float) -> None: ...


class Gate:
    def __init__(
        self, app: ASGIApp, emulator: EmulatorForGate, routes: Sequence[BaseRoute]
    ) -> None:
        self._app = app
        self._emulator = emulator
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(CONTROL_PREFIX):
            await self._app(scope, receive, send)
            return
        moved = _unprefixed(scope)
        if moved is None and self._emulator.settings.redirect_status is not None:
            await self._redirect(scope, receive, send)
            return
        scope = moved or scope
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
            wall = self._emulator.time.wall()
            headers = retry_after(wait, settings.retry_after_format, wall)
            self._emulator.counters.record_rate_limited(
                now=now, retry_after_seconds=announced_seconds(headers, wall)
            )
            return error_response(
                429, "rate limit exceeded", headers=headers | self._should_retry_headers()
            )
        return None

    def _should_retry_headers(self) -> dict[str, str]:
        value = self._emulator.settings.should_retry_header
        return {} if value is None else {"x-should-retry": value}

    def _fault_headers(self) -> dict[str, str]:
        settings = self._emulator.settings
        headers = self._should_retry_headers()
        if settings.fault_retry_after is not None:
            headers |= retry_after(
                settings.fault_retry_after, settings.retry_after_format, self._emulator.time.wall()
            )
        return headers

    async def _redirect(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = self._emulator.settings.redirect_status
        assert status is not None
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        location = MOVED_PREFIX + raw_path.decode("latin-1")
        if scope.get("query_string"):
            location += "?" + scope["query_string"].decode("latin-1")
        self._emulator.counters.record_fault("redirected")
        self._emulator.counters.record_request(
            f"{scope['method']} {self._route_template(scope)}", status
        )
        response = Response(status_code=status, headers={"location": location})
        await response(scope, receive, send)

    async def _run_with_faults(
        self, scope: Scope, receive: Receive, send: Send, route: str
    ) -> None:
        counters = self._emulator.counters
        plan = self._emulator.plan_faults(creates=scope["method"] == "POST")
        if plan.error_status is not None:
            counters.record_fault("error_5xx" if plan.error_status >= 500 else "error")
            counters.record_request(route, plan.error_status)
            message = "emulated server error" if plan.error_status >= 500 else "emulated error"
            answer = error_response(plan.error_status, message, headers=self._fault_headers())
            await answer(scope, receive, send)
            return
        held = _HeldResponse()
        await self._app(scope, receive, held.collect)
        if plan.accept_then_500 and held.status < 300:
            counters.record_fault("accept_then_500")
            held = _HeldResponse()
            await error_response(
                500,
                "emulated server error after accepting the request",
                headers=self._fault_headers(),
            )(scope, receive, held.collect)
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


def _unprefixed(scope: Scope) -> Scope | None:
    """The scope of a request under :data:`MOVED_PREFIX` as if it had come without it."""
    path: str = scope["path"]
    if not path.startswith(MOVED_PREFIX + "/"):
        return None
    raw_path: bytes = scope.get("raw_path") or path.encode()
    return {
        **scope,
        "path": path[len(MOVED_PREFIX) :],
        "raw_path": raw_path[len(MOVED_PREFIX) :],
    }
