"""Async client for the bem API: v3 workflow calls, v3 call reads and listings, v2 calls.

One client holds one connection pool (:mod:`runner.api.http`: the limiter, redirects, the
SDK's retries for reads; POSTs are never retried). Every failure leaves this module as a
:mod:`runner.errors` class that says what the caller may do next (see
:mod:`runner.api.failures` for the whole mapping):

- :class:`TransientError` — nothing happened on bem's side, or a read failed; asking again is
  safe (:class:`RateLimitedError` for a 429, with ``retry_after``).
- :class:`OutcomeUnknownError` — a POST that creates calls was (perhaps) sent, but its answer
  was lost, was a 5xx or a 409, or carried no call: a call may exist, so look for its
  ``callReferenceID`` before sending it again.
- :class:`AuthError`, :class:`PermanentError`, :class:`NotFoundError` — asking again will not
  help.

Requests are written as bem's official SDK writes them (:mod:`runner.api.encoding`).
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import IO, Self

import httpx

from runner.api import encoding, failures
from runner.api.failures import parse_retry_after
from runner.api.http import BemHttp, parse
from runner.api.models import (
    UNREADABLE,
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
from runner.errors import ConfigError, NotFoundError, OutcomeUnknownError
from runner.ratelimit import RateLimiter

__all__ = ["BemClient", "parse_retry_after"]


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
        self._http = BemHttp(
            base_url=base_url,
            api_key=api_key,
            limiter=limiter,
            transport=transport,
            timeout=timeout,
            read_attempts=read_attempts,
            clock=clock if clock is not None else SystemClock(),
            rng=rng if rng is not None else random.Random(),
            on_response=on_response,
        )

    def __repr__(self) -> str:
        return f"BemClient(base_url={self._base_url!r})"

    async def __aenter__(self) -> Self:
        self._http.pool()
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
        await self._http.aclose()

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
                    request = self._http.json_request(
                        path, document, params={"wait": "true"} if wait else None
                    )
            response = await self._http.exchange(request, route=route, kind="submit", creates=True)
        if wait and response.is_server_error:
            failed_call = _call_from_failed_wait(response)
            if failed_call is not None:
                return failed_call
        self._http.raise_for_status(response, creates=True)
        call = parse(response, CallResponse, creates=True).call
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
        found = await self._http.read(path, route="/v3/calls/{callID}", model=CallResponse)
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
        page = await self._http.read("/v3/calls", route="/v3/calls", model=CallList, params=params)
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
            request = self._http.json_request(route, document)
        response = await self._http.exchange(request, route=route, kind="submit", creates=True)
        self._http.raise_for_status(response, creates=True)
        return parse(response, V2CreateResponse, creates=True).calls

    async def get_call_v2(self, call_id: str) -> V2Call:
        """``GET /v2/calls/{callID}``, retried on transient failures; NotFoundError for a 404
        or ``{"call": null}``."""
        path = f"/v2/calls/{encoding.call_id_segment(call_id)}"
        found = await self._http.read(path, route="/v2/calls/{callID}", model=V2CallResponse)
        if found.call is None:
            raise NotFoundError(f"GET {path}: bem answered without a call (call: null)")
        return found.call

    # -- requests ------------------------------------------------------------------------------

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
        return self._http.pool().build_request("POST", path, data=form, files=parts)


def _check_file_count(files: Sequence[UploadFile], *, batch: bool) -> None:
    if batch and not files:
        raise ValueError("a batchFiles call needs at least one file")
    if not batch and len(files) != 1:
        raise ValueError(f"a singleFile call needs exactly one file, got {len(files)}")


def _call_from_failed_wait(response: httpx.Response) -> Call | None:
    """The call a ``wait=true`` invocation reports as failed (HTTP 500 with the call), if any."""
    try:
        return CallResponse.from_json(response.content).call
    except UNREADABLE:
        return None
