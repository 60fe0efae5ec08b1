"""Async client for the bem API: v3 workflow calls, v3 call reads and listings, v2 calls.

One client holds one httpx connection pool. Every failure leaves this module as a
:mod:`runner.errors` class that says what the caller may do next (see
:mod:`runner.api.failures` for the whole mapping):

- :class:`TransientError` — nothing happened on bem's side, or a read failed; asking again is
  safe (:class:`RateLimitedError` for a 429, with ``retry_after``).
- :class:`OutcomeUnknownError` — a POST that creates calls was (perhaps) sent, but its answer
  was lost, was a 5xx or a 409, or carried no call: a call may exist, so look for its
  ``callReferenceID`` before sending it again.
- :class:`AuthError`, :class:`PermanentError`, :class:`NotFoundError` — asking again will not
  help.

Requests are written as bem's official SDK writes them (:mod:`runner.api.encoding`). Reads
(GETs) are retried here as the SDK retries them — ``x-should-retry`` first, then 408, 409, 429
and 5xx — waiting ``retry-after-ms`` / ``Retry-After`` or else :func:`runner.policy.retry_delay`;
POSTs never are. Redirects are followed on the same origin only (307/308 send the same body
again), so the API key never goes to another host. Every attempt passes through the shared
rate limiter when one is given.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack
from types import TracebackType
from typing import IO, Self, TypeVar

import httpx
import structlog
from pydantic import BaseModel, ValidationError

from runner import __version__
from runner.api import encoding, failures
from runner.api.failures import parse_retry_after
from runner.api.models import (
    Call,
    CallFilter,
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
    ConfigError,
    NotFoundError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from runner.policy import retry_delay
from runner.ratelimit import RateLimiter

__all__ = ["BemClient", "parse_retry_after"]

_ModelT = TypeVar("_ModelT", bound=BaseModel)

# A read is retried inside the client only while the server asks for at most this long (as the
# SDK); a longer Retry-After goes back to the caller, which reschedules the work.
RETRY_AFTER_HONOURED_SECONDS = 60.0
MAX_REDIRECTS = 10

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
        """``on_response(method, route, status)`` hears of each exchange (None: no answer).

        An API key that no HTTP header can carry is a :class:`ConfigError` that never shows it.
        """
        if read_attempts < 1:
            raise ValueError("read_attempts must be at least 1")
        problem = encoding.header_value_problem(api_key)
        if problem is not None:
            raise ConfigError(f"the API key cannot be sent in the x-api-key header: {problem}")
        self._base_url = base_url
        self._api_key = api_key
        self._redactor = failures.Redactor(api_key)
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
        sending); a file that cannot be read, or a workflow name no URL can address, is a
        :class:`PermanentError` before anything is sent. ``multipart`` is a preference: a
        batch whose item references a form cannot carry exactly goes as JSON. With ``wait`` a
        failed call comes back as a 500 that carries the call, which is returned like any other.
        """
        _check_file_count(files, batch=batch)
        path = f"/v3/workflows/{encoding.workflow_segment(workflow_name)}/call"
        route = "/v3/workflows/{workflowName}/call"
        with ExitStack() as open_files:
            with encoding.reading_input_files():
                if multipart and encoding.multipart_can_carry(files, batch=batch):
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
                        "input": encoding.input_document(files, batch=batch),
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
        self._raise_for_status(response, creates=True)
        call = _parse(response, CallResponse, creates=True).call
        if call is None:
            raise OutcomeUnknownError(
                f"{failures.target(response.request)}: HTTP {response.status_code} without a "
                f"call{failures.MAYBE_CREATED}",
                status_code=response.status_code,
            )
        return call

    async def get_call(self, call_id: str) -> Call:
        """``GET /v3/calls/{callID}``, retried on transient failures; NotFoundError when bem
        answers 404 or with ``{"call": null}``."""
        path = f"/v3/calls/{encoding.call_id_segment(call_id)}"
        found = await self._read(path, route="/v3/calls/{callID}", model=CallResponse)
        if found.call is None:
            raise NotFoundError(f"GET {path}: bem answered without a call (call: null)")
        return found.call

    async def list_calls(
        self,
        filters: CallFilter | None = None,
        *,
        limit: int | None = None,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[Call]:
        """One page of ``GET /v3/calls``, retried on transient failures.

        List filters go as one key with comma-joined values, as bem's SDK sends them; an
        empty list is no filter. A value holding a comma cannot be sent: PermanentError.
        """
        query = (filters or CallFilter()).query()
        query.update(limit=limit, startingAfter=starting_after, endingBefore=ending_before)
        params = encoding.list_query(query)
        page = await self._read("/v3/calls", route="/v3/calls", model=CallList, params=params)
        return page.calls

    async def iter_calls(
        self, filters: CallFilter | None = None, *, limit: int | None = None
    ) -> AsyncIterator[Call]:
        """Every call matching the filters, page by page (``limit`` is the page size).

        The next page starts after the last call of the previous one; an empty page ends it.
        """
        cursor: str | None = None
        while True:
            page = await self.list_calls(filters, limit=limit, starting_after=cursor)
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
                    "input": encoding.input_document(entry.files, batch=entry.batch),
                }
                for entry in requests
            ]
        }
        with encoding.reading_input_files():
            request = self._json_request(route, document)
        response = await self._exchange(request, route=route, kind="submit", creates=True)
        self._raise_for_status(response, creates=True)
        return _parse(response, V2CreateResponse, creates=True).calls

    async def get_call_v2(self, call_id: str) -> V2Call:
        """``GET /v2/calls/{callID}``, retried on transient failures; NotFoundError for a 404
        or ``{"call": null}``."""
        path = f"/v2/calls/{encoding.call_id_segment(call_id)}"
        found = await self._read(path, route="/v2/calls/{callID}", model=V2CallResponse)
        if found.call is None:
            raise NotFoundError(f"GET {path}: bem answered without a call (call: null)")
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
        body = encoding.encode_json(document)
        return self._pool().build_request(
            "POST",
            path,
            params=params,
            content=body,
            headers={
                "content-type": "application/json",
                # Set explicitly so the parts go out as one sized body, not chunked.
                "content-length": str(body.length),
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
            handle = open_files.enter_context(file.path.open("rb"))
            filename = encoding.form_filename(file, batch=batch)
            parts.append((field, (filename, handle, encoding.content_type_for(file.path))))
        return self._pool().build_request("POST", path, data=form, files=parts)

    async def _read(
        self,
        path: str,
        *,
        route: str,
        model: type[_ModelT],
        params: httpx.QueryParams | None = None,
    ) -> _ModelT:
        """A GET with the SDK's retry rule: up to ``read_attempts`` tries."""
        attempt = 0
        while True:
            request = self._pool().build_request("GET", path, params=params)
            failure = await self._try_read(request, route=route, model=model)
            if not isinstance(failure, _Retry):
                return failure
            attempt += 1
            retry_after = failure.error.retry_after
            if attempt >= self._read_attempts or (
                retry_after is not None and retry_after > RETRY_AFTER_HONOURED_SECONDS
            ):
                raise failure.error
            await self._clock.sleep(
                retry_delay(attempt - 1, rng=self._rng, retry_after=retry_after)
            )

    async def _try_read(
        self, request: httpx.Request, *, route: str, model: type[_ModelT]
    ) -> _ModelT | _Retry:
        try:
            response = await self._exchange(request, route=route, kind="poll", creates=False)
        except TransientError as exc:
            return _Retry(exc)
        if not response.is_success:
            error = self._status_error(response, creates=False)
            if not failures.should_retry(response):
                raise error
            return _Retry(_as_transient(error))
        try:
            return _parse(response, model, creates=False)
        except TransientError as exc:
            return _Retry(exc)

    def _slot(self, kind: str) -> AbstractAsyncContextManager[object]:
        if self._limiter is None:
            return contextlib.nullcontext()
        return self._limiter.slot(kind)

    async def _exchange(
        self, request: httpx.Request, *, route: str, kind: str, creates: bool
    ) -> httpx.Response:
        """Send one request through the limiter, following same-origin redirects; transport
        failures become :mod:`runner.errors`."""
        async with self._slot(kind):
            for _ in range(MAX_REDIRECTS + 1):
                response = await self._send_once(request, route=route, creates=creates)
                following = response.next_request
                if following is None:
                    self._tell_limiter(response)
                    return response
                await response.aread()
                _check_same_origin(request, following, status=response.status_code)
                request = following
        raise PermanentError(
            f"{failures.target(request)}: more than {MAX_REDIRECTS} redirects; not followed"
        )

    async def _send_once(
        self, request: httpx.Request, *, route: str, creates: bool
    ) -> httpx.Response:
        method = request.method
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
            error = failures.transport_error(
                exc, where=failures.target(request), creates=creates, redactor=self._redactor
            )
            if failures.text_is_safe(exc):
                raise error from exc
            # The cause's text may hold a header value (LocalProtocolError): never chain it.
            raise error from None
        _log.debug(
            "bem request",
            method=method,
            route=route,
            status=response.status_code,
            duration=round(self._clock.now() - started, 3),
        )
        if self._on_response is not None:
            self._on_response(method, route, response.status_code)
        return response

    def _tell_limiter(self, response: httpx.Response) -> None:
        if self._limiter is None:
            return
        if response.status_code == httpx.codes.TOO_MANY_REQUESTS:
            self._limiter.on_rate_limited(self._retry_after(response))
        elif response.is_success:
            self._limiter.on_success()

    def _retry_after(self, response: httpx.Response) -> float | None:
        return failures.retry_after_seconds(response.headers, now=self._clock.wall())

    def _raise_for_status(self, response: httpx.Response, *, creates: bool) -> None:
        if not response.is_success:
            raise self._status_error(response, creates=creates)

    def _status_error(self, response: httpx.Response, *, creates: bool) -> ApiError:
        what = f"{failures.target(response.request)}: HTTP {response.status_code}"
        detail = self._redactor.redact(failures.error_detail(response.content))
        return failures.status_error(
            response.status_code,
            creates=creates,
            message=f"{what}: {detail}" if detail else what,
            should_retry=failures.should_retry_header(response.headers),
            retry_after=self._retry_after(response),
        )


class _Retry:
    """A read attempt that may be tried again, and the error to raise if it is not."""

    def __init__(self, error: TransientError) -> None:
        self.error = error


def _as_transient(error: ApiError) -> TransientError:
    """A retryable answer as the TransientError that is raised should the retries run out."""
    if isinstance(error, TransientError):
        return error
    return TransientError(error.message, status_code=error.status_code)


def _check_same_origin(sent: httpx.Request, following: httpx.Request, *, status: int) -> None:
    here, there = sent.url, following.url
    if (here.scheme, here.host, here.port) != (there.scheme, there.host, there.port):
        raise PermanentError(
            f"{failures.target(sent)}: HTTP {status} redirects to "
            f"{there.scheme}://{there.netloc.decode('ascii', 'replace')}, another origin; not "
            "followed, so the API key goes nowhere else (set api.base_url to where bem is)",
            status_code=status,
        )


def _check_file_count(files: Sequence[UploadFile], *, batch: bool) -> None:
    if batch and not files:
        raise ValueError("a batchFiles call needs at least one file")
    if not batch and len(files) != 1:
        raise ValueError(f"a singleFile call needs exactly one file, got {len(files)}")


def _parse(response: httpx.Response, model: type[_ModelT], *, creates: bool) -> _ModelT:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        message = (
            f"{failures.target(response.request)}: HTTP {response.status_code} "
            f"with a body that is not a valid {model.__name__}"
        )
        if creates:
            raise OutcomeUnknownError(
                message + failures.MAYBE_CREATED, status_code=response.status_code
            ) from exc
        raise TransientError(message, status_code=response.status_code) from exc


def _call_from_failed_wait(response: httpx.Response) -> Call | None:
    """The call a ``wait=true`` invocation reports as failed (HTTP 500 with the call), if any."""
    try:
        return CallResponse.model_validate_json(response.content).call
    except ValidationError:
        return None
