"""Async client for the bem API: v3 workflow calls, v3 call reads and listings, v2 calls.

One client holds one httpx connection pool. Every failure leaves this module as a
:mod:`runner.errors` class that says what the caller may do next:

- :class:`TransientError` — nothing happened on bem's side, or a read failed; asking again is
  safe (:class:`RateLimitedError` for a 429, with ``retry_after``).
- :class:`OutcomeUnknownError` — a POST that creates calls was (perhaps) sent, but its answer
  was lost or was a 5xx: a call may exist, so look for its ``callReferenceID`` before sending
  it again.
- :class:`AuthError`, :class:`PermanentError`, :class:`NotFoundError` — asking again will not
  help.

Reads (GETs) are retried here with exponential backoff and full jitter; POSTs never are.
Every attempt passes through the shared rate limiter when one is given.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import mimetypes
import random
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self, TypeVar

import httpx
import structlog
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from runner import __version__
from runner.api.models import (
    Call,
    CallList,
    CallResponse,
    UploadFile,
    V2Call,
    V2CallRequest,
    V2CallResponse,
    V2CreateResponse,
)
from runner.clock import Clock, SystemClock
from runner.errors import (
    ApiError,
    AuthError,
    ConfigError,
    NotFoundError,
    OutcomeUnknownError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from runner.ratelimit import RateLimiter

__all__ = ["BemClient", "CallStatusFilter", "CallTypeFilter", "SortOrder", "parse_retry_after"]

SortOrder = Literal["asc", "desc"]
CallStatusFilter = Literal["pending", "running", "completed", "failed"]
CallTypeFilter = Literal["workflow", "direct_function", "adhoc_function"]

_ModelT = TypeVar("_ModelT", bound=BaseModel)
_T = TypeVar("_T")

# Read retries: full jitter over an exponentially growing ceiling.
_BACKOFF_BASE_SECONDS = 0.5
_BACKOFF_MAX_SECONDS = 30.0
# A multiple of 3, so base64 of consecutive chunks concatenates to base64 of the whole file.
_READ_CHUNK_BYTES = 3 * 256 * 1024
_MESSAGE_MAX_CHARS = 500

_log = structlog.get_logger(__name__)


class BemClient:
    """The bem API over one shared connection pool; use as ``async with BemClient(...) as c``."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        limiter: RateLimiter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 60.0,
        read_attempts: int = 5,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        on_response: Callable[[str, str, int | None], None] | None = None,
    ) -> None:
        """``on_response(method, route, status)`` hears of each exchange (None: no answer)."""
        if read_attempts < 1:
            raise ValueError("read_attempts must be at least 1")
        self._base_url = base_url
        self._api_key = api_key
        self._limiter = limiter
        self._transport = transport
        self._timeout = timeout
        self._read_attempts = read_attempts
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._rng = rng if rng is not None else random.Random()
        self._on_response = on_response
        self._http: httpx.AsyncClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"BemClient(base_url={self._base_url!r})"

    async def __aenter__(self) -> Self:
        self._pool()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        self._closed = True
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    # -- v3 ------------------------------------------------------------------------------------

    async def invoke_workflow(
        self,
        workflow_name: str,
        files: Sequence[UploadFile],
        *,
        call_reference_id: str,
        batch: bool,
        metadata: Mapping[str, object] | None = None,
        wait: bool = False,
        multipart: bool = False,
    ) -> Call:
        """``POST /v3/workflows/{workflowName}/call``; never retried (see module docstring).

        Files are read when the request is built (multipart: opened then, streamed while
        sending); a file that cannot be read is a :class:`PermanentError` before anything is
        sent. With ``wait`` a failed call comes back as a 500 that carries the call, which is
        returned like any other.
        """
        _check_file_count(files, batch=batch)
        path = f"/v3/workflows/{_segment(workflow_name)}/call"
        route = "/v3/workflows/{workflowName}/call"
        with ExitStack() as open_files:
            with _reading_input_files():
                if multipart:
                    request = self._multipart_request(
                        path,
                        files,
                        open_files,
                        batch=batch,
                        call_reference_id=call_reference_id,
                        metadata=metadata,
                        wait=wait,
                    )
                else:
                    document: dict[str, object] = {
                        "input": _input_document(files, batch=batch),
                        "callReferenceID": call_reference_id,
                    }
                    if metadata is not None:
                        document["metadata"] = dict(metadata)
                    request = self._json_request(
                        path, document, params={"wait": "true"} if wait else None
                    )
            response = await self._exchange(request, route=route, kind="submit", creates=True)
        if wait and response.is_server_error:
            failed_call = _call_from_failed_wait(response)
            if failed_call is not None:
                return failed_call
        self._raise_for_status(response, route=route, creates=True)
        return _parse(response, CallResponse, route=route, creates=True).call

    async def get_call(self, call_id: str) -> Call:
        """``GET /v3/calls/{callID}``, retried on transient failures."""
        path = f"/v3/calls/{_segment(call_id)}"
        found = await self._read(path, route="/v3/calls/{callID}", model=CallResponse)
        return found.call

    async def list_calls(
        self,
        *,
        call_ids: Sequence[str] | None = None,
        reference_ids: Sequence[str] | None = None,
        reference_id_substring: str | None = None,
        workflow_ids: Sequence[str] | None = None,
        workflow_names: Sequence[str] | None = None,
        statuses: Sequence[CallStatusFilter] | None = None,
        call_types: Sequence[CallTypeFilter] | None = None,
        function_names: Sequence[str] | None = None,
        sort_order: SortOrder | None = None,
        limit: int | None = None,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[Call]:
        """One page of ``GET /v3/calls``, retried on transient failures."""
        params = _list_params(
            callIDs=call_ids,
            referenceIDs=reference_ids,
            referenceIDSubstring=reference_id_substring,
            workflowIDs=workflow_ids,
            workflowNames=workflow_names,
            statuses=statuses,
            callTypes=call_types,
            functionNames=function_names,
            sortOrder=sort_order,
            limit=limit,
            startingAfter=starting_after,
            endingBefore=ending_before,
        )
        page = await self._read("/v3/calls", route="/v3/calls", model=CallList, params=params)
        return page.calls

    async def iter_calls(
        self,
        *,
        call_ids: Sequence[str] | None = None,
        reference_ids: Sequence[str] | None = None,
        reference_id_substring: str | None = None,
        workflow_ids: Sequence[str] | None = None,
        workflow_names: Sequence[str] | None = None,
        statuses: Sequence[CallStatusFilter] | None = None,
        call_types: Sequence[CallTypeFilter] | None = None,
        function_names: Sequence[str] | None = None,
        sort_order: SortOrder | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Call]:
        """Every call matching the filters, page by page (``limit`` is the page size).

        The next page starts after the last call of the previous one; an empty page ends it.
        """
        cursor: str | None = None
        while True:
            page = await self.list_calls(
                call_ids=call_ids,
                reference_ids=reference_ids,
                reference_id_substring=reference_id_substring,
                workflow_ids=workflow_ids,
                workflow_names=workflow_names,
                statuses=statuses,
                call_types=call_types,
                function_names=function_names,
                sort_order=sort_order,
                limit=limit,
                starting_after=cursor,
            )
            if not page:
                return
            for call in page:
                yield call
            cursor = page[-1].call_id

    # -- v2 ------------------------------------------------------------------------------------

    async def create_calls_v2(self, requests: Sequence[V2CallRequest]) -> list[V2Call]:
        """``POST /v2/calls`` with several calls in one request; never retried.

        Returns the created calls in request order.
        """
        if not requests:
            raise ValueError("create_calls_v2 needs at least one call")
        for entry in requests:
            _check_file_count(entry.files, batch=entry.batch)
        route = "/v2/calls"
        document = {
            "calls": [
                {
                    "workflowName": entry.workflow_name,
                    "callReferenceID": entry.call_reference_id,
                    "input": _input_document(entry.files, batch=entry.batch),
                }
                for entry in requests
            ]
        }
        with _reading_input_files():
            request = self._json_request(route, document)
        response = await self._exchange(request, route=route, kind="submit", creates=True)
        self._raise_for_status(response, route=route, creates=True)
        return _parse(response, V2CreateResponse, route=route, creates=True).calls

    async def get_call_v2(self, call_id: str) -> V2Call:
        """``GET /v2/calls/{callID}``, retried on transient failures."""
        path = f"/v2/calls/{_segment(call_id)}"
        found = await self._read(path, route="/v2/calls/{callID}", model=V2CallResponse)
        return found.call

    # -- requests ------------------------------------------------------------------------------

    def _pool(self) -> httpx.AsyncClient:
        if self._closed:
            raise RuntimeError("BemClient is closed")
        if self._http is None:
            try:
                self._http = httpx.AsyncClient(
                    base_url=self._base_url,
                    transport=self._transport,
                    timeout=httpx.Timeout(self._timeout),
                    headers={
                        "x-api-key": self._api_key,
                        "accept": "application/json",
                        "user-agent": f"bem-runner/{__version__}",
                    },
                )
            except httpx.InvalidURL as exc:
                raise ConfigError(f"invalid bem base URL {self._base_url!r}: {exc}") from exc
        return self._http

    def _json_request(
        self, path: str, document: Mapping[str, object], *, params: Mapping[str, str] | None = None
    ) -> httpx.Request:
        parts = _encode_json(document)
        return self._pool().build_request(
            "POST",
            path,
            params=params,
            content=_PartsStream(parts),
            headers={
                "content-type": "application/json",
                # Set explicitly so the parts go out as one sized body, not chunked.
                "content-length": str(sum(len(part) for part in parts)),
            },
        )

    def _multipart_request(
        self,
        path: str,
        files: Sequence[UploadFile],
        open_files: ExitStack,
        *,
        batch: bool,
        call_reference_id: str,
        metadata: Mapping[str, object] | None,
        wait: bool,
    ) -> httpx.Request:
        form: dict[str, str] = {
            "callReferenceID": call_reference_id,
            "wait": "true" if wait else "false",
        }
        # The form carries one inputType for all its files; when a batch mixes types, bem
        # tells each file's type from its name (the itemReferenceID keeps the extension).
        input_types = {file.input_type for file in files}
        if len(input_types) == 1:
            form["inputType"] = input_types.pop()
        if metadata is not None:
            form["metadata"] = json.dumps(dict(metadata), allow_nan=False)
        field = "files" if batch else "file"
        parts: list[tuple[str, tuple[str, IO[bytes], str]]] = []
        for file in files:
            filename = _item_reference_id(file) if batch else file.path.name
            handle = open_files.enter_context(file.path.open("rb"))
            parts.append((field, (filename, handle, _content_type(file.path))))
        return self._pool().build_request("POST", path, data=form, files=parts)

    async def _read(
        self,
        path: str,
        *,
        route: str,
        model: type[_ModelT],
        params: httpx.QueryParams | None = None,
    ) -> _ModelT:
        async def attempt() -> _ModelT:
            request = self._pool().build_request("GET", path, params=params)
            response = await self._exchange(request, route=route, kind="poll", creates=False)
            self._raise_for_status(response, route=route, creates=False)
            return _parse(response, model, route=route, creates=False)

        return await self._with_retries(attempt)

    async def _with_retries(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._read_attempts),
            wait=self._backoff,
            retry=retry_if_exception_type(TransientError),
            sleep=self._clock.sleep,
            reraise=True,
        )
        result: _T = await retrying(attempt)
        return result

    def _backoff(self, state: RetryCallState) -> float:
        ceiling = min(_BACKOFF_MAX_SECONDS, _BACKOFF_BASE_SECONDS * 2 ** (state.attempt_number - 1))
        delay = self._rng.uniform(0.0, ceiling)
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, TransientError) and error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return delay

    def _slot(self, kind: str) -> AbstractAsyncContextManager[object]:
        if self._limiter is None:
            return contextlib.nullcontext()
        return self._limiter.slot(kind)

    async def _exchange(
        self, request: httpx.Request, *, route: str, kind: str, creates: bool
    ) -> httpx.Response:
        """Send one request through the limiter; transport failures become :mod:`runner.errors`."""
        method = request.method
        async with self._slot(kind):
            started = self._clock.now()
            try:
                response = await self._pool().send(request)
            # OSError: a multipart file that could not be read while its body was streaming.
            except (httpx.HTTPError, OSError) as exc:
                _log.debug(
                    "bem request failed",
                    method=method,
                    route=route,
                    error=type(exc).__name__,
                    duration=round(self._clock.now() - started, 3),
                )
                if self._on_response is not None:
                    self._on_response(method, route, None)
                raise _transport_error(exc, method=method, route=route, creates=creates) from exc
            _log.debug(
                "bem request",
                method=method,
                route=route,
                status=response.status_code,
                duration=round(self._clock.now() - started, 3),
            )
            if self._on_response is not None:
                self._on_response(method, route, response.status_code)
            if self._limiter is not None:
                if response.status_code == httpx.codes.TOO_MANY_REQUESTS:
                    self._limiter.on_rate_limited(self._retry_after(response))
                elif response.is_success:
                    self._limiter.on_success()
        return response

    def _retry_after(self, response: httpx.Response) -> float | None:
        return parse_retry_after(response.headers.get("retry-after"), now=self._clock.wall())

    def _raise_for_status(self, response: httpx.Response, *, route: str, creates: bool) -> None:
        status = response.status_code
        if response.is_success:
            return
        what = f"{response.request.method} {route}: HTTP {status}"
        detail = self._redact(_error_message(response))
        message = f"{what}: {detail}" if detail else what
        if status == httpx.codes.TOO_MANY_REQUESTS:
            raise RateLimitedError(
                message, status_code=status, retry_after=self._retry_after(response)
            )
        if status == httpx.codes.REQUEST_TIMEOUT:
            raise TransientError(message, status_code=status)
        if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
            raise AuthError(message, status_code=status)
        if status == httpx.codes.NOT_FOUND:
            raise NotFoundError(message, status_code=status)
        if status >= 500:
            if creates:
                raise OutcomeUnknownError(
                    f"{message}; a call may have been created", status_code=status
                )
            raise TransientError(message, status_code=status)
        raise PermanentError(message, status_code=status)

    def _redact(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            return text.replace(self._api_key, "[redacted]")
        return text


# -- request bodies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileContent:
    """Stands for a file's base64 content in a JSON document until the body is encoded."""

    path: Path


class _PartsStream(httpx.AsyncByteStream):
    """A request body sent as the byte strings it was built from, without joining them."""

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            yield part


class _BodyWriter:
    """Collects a body as byte strings: small pieces are merged, large ones kept as they are."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pending = bytearray()

    def small(self, data: bytes) -> None:
        self._pending += data

    def large(self, data: bytes) -> None:
        self._flush()
        self._parts.append(data)

    def finish(self) -> list[bytes]:
        self._flush()
        return self._parts

    def _flush(self) -> None:
        if self._pending:
            self._parts.append(bytes(self._pending))
            self._pending.clear()


@contextlib.contextmanager
def _reading_input_files() -> Iterator[None]:
    """An input file that cannot be read fails the request before anything is sent."""
    try:
        yield
    except OSError as exc:
        raise PermanentError(f"cannot read input file: {exc}") from exc


def _check_file_count(files: Sequence[UploadFile], *, batch: bool) -> None:
    if batch and not files:
        raise ValueError("a batchFiles call needs at least one file")
    if not batch and len(files) != 1:
        raise ValueError(f"a singleFile call needs exactly one file, got {len(files)}")


def _input_document(files: Sequence[UploadFile], *, batch: bool) -> dict[str, object]:
    if batch:
        inputs = [_file_document(file, item_reference=True) for file in files]
        return {"batchFiles": {"inputs": inputs}}
    return {"singleFile": _file_document(files[0], item_reference=False)}


def _file_document(file: UploadFile, *, item_reference: bool) -> dict[str, object]:
    document: dict[str, object] = {"inputType": file.input_type}
    if item_reference:
        document["itemReferenceID"] = _item_reference_id(file)
    document["inputContent"] = _FileContent(file.path)
    return document


def _item_reference_id(file: UploadFile) -> str:
    return file.item_reference_id if file.item_reference_id is not None else file.path.name


def _encode_json(document: Mapping[str, object]) -> list[bytes]:
    """Serialize ``document`` to JSON, reading and base64-encoding its files now."""
    writer = _BodyWriter()
    _write_json(document, writer)
    return writer.finish()


def _write_json(value: object, writer: _BodyWriter) -> None:
    if isinstance(value, _FileContent):
        writer.small(b'"')
        with value.path.open("rb") as handle:
            while chunk := handle.read(_READ_CHUNK_BYTES):
                writer.large(base64.b64encode(chunk))
        writer.small(b'"')
    elif isinstance(value, Mapping):
        writer.small(b"{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                writer.small(b",")
            writer.small(_json_bytes(str(key)) + b":")
            _write_json(item, writer)
        writer.small(b"}")
    elif isinstance(value, list):
        writer.small(b"[")
        for index, item in enumerate(value):
            if index:
                writer.small(b",")
            _write_json(item, writer)
        writer.small(b"]")
    else:
        writer.small(_json_bytes(value))


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")


def _content_type(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _list_params(**filters: Sequence[str] | str | int | None) -> httpx.QueryParams:
    """Query parameters for ``GET /v3/calls``; a list filter repeats its key."""
    params: list[tuple[str, str]] = []
    for name, value in filters.items():
        if value is None:
            continue
        if isinstance(value, str | int):
            params.append((name, str(value)))
        else:
            params.extend((name, item) for item in value)
    return httpx.QueryParams(tuple(params))


# -- responses ---------------------------------------------------------------------------------


def _parse(response: httpx.Response, model: type[_ModelT], *, route: str, creates: bool) -> _ModelT:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        message = (
            f"{response.request.method} {route}: HTTP {response.status_code} "
            f"with a body that is not a valid {model.__name__}"
        )
        if creates:
            raise OutcomeUnknownError(
                f"{message}; a call may have been created", status_code=response.status_code
            ) from exc
        raise TransientError(message, status_code=response.status_code) from exc


def _call_from_failed_wait(response: httpx.Response) -> Call | None:
    """The call a ``wait=true`` invocation reports as failed (HTTP 500 with the call), if any."""
    try:
        return CallResponse.model_validate_json(response.content).call
    except ValidationError:
        return None


def _error_message(response: httpx.Response) -> str:
    """bem's ``error`` message, or the start of whatever else the body holds."""
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])[:_MESSAGE_MAX_CHARS]
    return response.content[:_MESSAGE_MAX_CHARS].decode("utf-8", "replace").strip()


def _transport_error(
    exc: httpx.HTTPError | OSError, *, method: str, route: str, creates: bool
) -> ApiError | ConfigError:
    what = f"{method} {route}: {type(exc).__name__}"
    detail = str(exc)
    message = f"{what}: {detail}" if detail else what
    if isinstance(exc, httpx.UnsupportedProtocol):
        return ConfigError(f"bem base URL: {message}")
    never_sent = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)
    if isinstance(exc, never_sent) or not creates:
        return TransientError(message)
    return OutcomeUnknownError(f"{message}; a call may have been created")


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    ``now`` is the current wall-clock time (Unix seconds) an HTTP date is measured from.
    Returns ``None`` for a missing or unreadable header; never a negative number.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
