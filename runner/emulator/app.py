"""The emulator's HTTP routes: the bem API (v3 and v2) and the ``/_emulator/*`` control routes.

Authentication, rate limiting, fault injection and request counting happen in front of these
routes, in :class:`runner.emulator.gate.Gate`; a handler only does the work of its endpoint.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from runner.emulator import render
from runner.emulator.errors import InvalidRequest, NotFound, RequestRejected
from runner.emulator.gate import EmulatorForGate, Gate, error_response
from runner.emulator.inputs import (
    CallInput,
    parse_bool,
    parse_call_fields,
    parse_form,
    parse_json_body,
    reject_unknown,
)
from runner.emulator.listing import ListQuery, parse_list_query
from runner.emulator.state import CallRecord, CallStore, Target
from runner.emulator.subscriptions import WebhookBook, subscription_routes
from runner.errors import ConfigError

MAX_FORM_FILES = 1000
_V2_TARGET_FIELDS = ("workflowName", "workflowID", "functionName", "functionID")


class EmulatorForApp(EmulatorForGate, Protocol):
    """What the routes do their work with (and what the gate in front of them needs)."""

    @property
    def calls(self) -> CallStore: ...
    @property
    def webhooks(self) -> WebhookBook: ...
    def create_call(self, target: Target, call_input: CallInput) -> CallRecord: ...
    def list_calls(self, query: ListQuery) -> list[CallRecord]: ...
    async def wait_for(self, record: CallRecord) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def update(self, **changes: object) -> None: ...
    def advance(self, seconds: float) -> None: ...
    def reset_stats(self) -> None: ...


def build_app(emulator: EmulatorForApp) -> Starlette:
    api = _Api(emulator)
    control = _Control(emulator)
    routes: list[BaseRoute] = [
        Route("/v3/workflows/{workflowName}/call", api.invoke_workflow, methods=["POST"]),
        Route("/v3/calls", api.list_calls, methods=["GET"]),
        Route("/v3/calls/{callID}", api.get_call, methods=["GET"]),
        Route("/v3/calls/{callID}/trace", api.get_trace, methods=["GET"]),
        Route("/v2/calls", api.create_v2_calls, methods=["POST"]),
        Route("/v2/calls/{callID}", api.get_v2_call, methods=["GET"]),
        *subscription_routes(emulator.webhooks),
        Route("/_emulator/stats", control.stats, methods=["GET"]),
        Route("/_emulator/settings", control.settings, methods=["GET", "POST"]),
        Route("/_emulator/advance", control.advance, methods=["POST"]),
        Route("/_emulator/reset-stats", control.reset_stats, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Gate, emulator=emulator, routes=routes)],
        exception_handlers={RequestRejected: _rejected, HTTPException: _http_error},
    )


async def _rejected(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestRejected):
        raise exc
    return error_response(exc.status_code, exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method, bad multipart) as JSON too."""
    if not isinstance(exc, HTTPException):
        raise exc
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


class _Api:
    def __init__(self, emulator: EmulatorForApp) -> None:
        self._emulator = emulator

    async def invoke_workflow(self, request: Request) -> Response:
        name = request.path_params["workflowName"]
        reject_unknown(request.query_params, frozenset({"wait"}), "query")
        wait_text = _single_query_value(request, "wait")
        if not self._emulator.settings.workflow_exists(name):
            raise NotFound(f"workflow {name!r} not found")
        call_input, form_wait = await _read_call(request)
        record = self._emulator.create_call(Target.workflow(name), call_input)
        wait = parse_bool(wait_text, "query parameter wait") if wait_text is not None else form_wait
        if not wait:
            return self._call_response(request, record, 202)
        await self._emulator.wait_for(record)
        status = record.status(self._emulator.time.now())
        if status == "completed":
            return self._call_response(request, record, 200)
        if status == "failed":
            return self._call_response(request, record, 500, error=_failure_summary(record))
        return self._call_response(request, record, 202)

    async def get_call(self, request: Request) -> Response:
        record = self._find(request)
        return self._call_response(request, record, 200)

    async def get_trace(self, request: Request) -> Response:
        record = self._find(request)
        return JSONResponse(render.trace(record, self._emulator.time.now()))

    async def list_calls(self, request: Request) -> Response:
        records = self._emulator.list_calls(parse_list_query(request.query_params))
        return JSONResponse({"calls": [self._v3_call(request, record) for record in records]})

    async def create_v2_calls(self, request: Request) -> Response:
        if _media_type(request) != "application/json":
            raise InvalidRequest(_unsupported_media_type(request, "application/json"))
        body = parse_json_body(await request.body())
        reject_unknown(body, frozenset({"calls"}), "request body")
        entries = body.get("calls")
        if not isinstance(entries, list) or not entries:
            raise InvalidRequest("calls: must be a non-empty array")
        # Everything is validated before anything is created: a bad entry creates no call.
        planned = [self._v2_entry(entry, f"calls[{index}]") for index, entry in enumerate(entries)]
        records = [self._emulator.create_call(target, call) for target, call in planned]
        now = self._emulator.time.now()
        return JSONResponse({"calls": [render.v2_call(record, now) for record in records]})

    async def get_v2_call(self, request: Request) -> Response:
        record = self._find(request)
        return JSONResponse({"call": render.v2_call(record, self._emulator.time.now())})

    def _v2_entry(self, entry: object, where: str) -> tuple[Target, CallInput]:
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{where}: must be a JSON object")
        call = parse_call_fields(entry, f"{where}.", other_fields=frozenset(_V2_TARGET_FIELDS))
        return self._v2_target(entry, where), call

    def _v2_target(self, entry: dict[str, Any], where: str) -> Target:
        given = [key for key in _V2_TARGET_FIELDS if entry.get(key) is not None]
        if len(given) != 1:
            raise InvalidRequest(f"{where}: provide exactly one of {', '.join(_V2_TARGET_FIELDS)}")
        key = given[0]
        value = entry[key]
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"{where}.{key}: must be a non-empty string")
        target = self._resolve_target(key, value)
        if target is None:
            raise NotFound(f"{where}.{key}: {value!r} not found")
        return target

    def _resolve_target(self, key: str, value: str) -> Target | None:
        settings = self._emulator.settings
        if key == "workflowName":
            return Target.workflow(value) if settings.workflow_exists(value) else None
        if key == "workflowID":
            configured = (Target.workflow(name) for name in settings.workflows)
            found = next((target for target in configured if target.id == value), None)
            return found or self._emulator.calls.workflow_by_id(value)
        if value.startswith("unknown-"):
            return None
        if key == "functionName":
            return Target.function(value)
        return Target.function(value, function_id=value)

    def _find(self, request: Request) -> CallRecord:
        call_id = request.path_params["callID"]
        record = self._emulator.calls.get(call_id)
        if record is None:
            raise NotFound(f"call {call_id!r} not found")
        return record

    def _call_response(
        self, request: Request, record: CallRecord, status_code: int, *, error: str | None = None
    ) -> Response:
        call = None if self._emulator.settings.null_call else self._v3_call(request, record)
        body: dict[str, Any] = {"call": call} if error is None else {"call": call, "error": error}
        return JSONResponse(body, status_code=status_code)

    def _v3_call(self, request: Request, record: CallRecord) -> dict[str, Any]:
        call = render.v3_call(record, self._emulator.time.now(), _base_url(request))
        if self._emulator.settings.null_events:
            call |= {"outputs": None, "errors": None}
        return call


class _Control:
    """``/_emulator/*``: for tests and benchmarks that drive an emulator over HTTP. No auth."""

    def __init__(self, emulator: EmulatorForApp) -> None:
        self._emulator = emulator

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self._emulator.stats())

    async def settings(self, request: Request) -> Response:
        if request.method == "POST":
            changes = parse_json_body(await request.body())
            try:
                self._emulator.update(**changes)
            except ConfigError as exc:
                raise InvalidRequest(exc.message) from exc
        return JSONResponse({"settings": self._emulator.settings.public_view()})

    async def advance(self, request: Request) -> Response:
        body = parse_json_body(await request.body())
        reject_unknown(body, frozenset({"seconds"}), "request body")
        seconds = body.get("seconds")
        if (
            not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise InvalidRequest("seconds: required, a non-negative number")
        self._emulator.advance(float(seconds))
        return JSONResponse({"advanced": seconds})

    async def reset_stats(self, request: Request) -> Response:
        self._emulator.reset_stats()
        return JSONResponse(self._emulator.stats())


async def _read_call(request: Request) -> tuple[CallInput, bool | None]:
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        async with request.form(max_files=MAX_FORM_FILES) as form:
            return await parse_form(form)
    if media_type != "application/json":
        raise InvalidRequest(
            _unsupported_media_type(request, "application/json or multipart/form-data")
        )
    return parse_call_fields(parse_json_body(await request.body())), None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _unsupported_media_type(request: Request, wanted: str) -> str:
    given = _media_type(request)
    if not given:
        return f"a Content-Type header is required; send {wanted}"
    return f"Content-Type {given!r} is not supported; send {wanted}"


def _single_query_value(request: Request, key: str) -> str | None:
    values = request.query_params.getlist(key)
    if len(values) > 1:
        raise InvalidRequest(f"query parameter {key}: given more than once")
    return values[0] if values else None


def _failure_summary(record: CallRecord) -> str:
    first = next(item.failure for item in record.items if item.failure is not None)
    return f"call failed: all {len(record.items)} item(s) failed; first: {first.message}"


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")
