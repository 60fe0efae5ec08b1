"""One bem connection pool and how a request goes through it: the rate limiter, same-origin
redirects, the SDK's retry rule for reads, and every failure as a :mod:`runner.errors` class
(:mod:`runner.api.failures` holds the mapping).

Reads (GETs) are retried here as the SDK retries them — ``x-should-retry`` first, then 408,
409, 429 and 5xx — waiting ``retry-after-ms`` / ``Retry-After`` or else
:func:`runner.policy.retry_delay`; POSTs never are. Redirects are followed on the same origin
only (307/308 send the same body again), so the API key never goes to another host. Every
attempt passes through the shared rate limiter when one is given.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import httpx
import structlog

from runner import __version__
from runner.api import encoding, failures
from runner.api.cookieless import CookielessClient
from runner.api.models import UNREADABLE, ApiResponse
from runner.clock import Clock
from runner.errors import (
    ApiError,
    ConfigError,
    OutcomeUnknownError,
    PermanentError,
    TransientError,
)
from runner.policy import retry_delay
from runner.ratelimit import RateLimiter

__all__ = ["BemHttp", "parse"]

_ModelT = TypeVar("_ModelT", bound=ApiResponse)

# A read is retried inside the client only while the server asks for at most this long (as the
# SDK); a longer Retry-After goes back to the caller, which reschedules the work.
RETRY_AFTER_HONOURED_SECONDS = 60.0
MAX_REDIRECTS = 10
SMALL_BODY_BYTES = 256 * 1024
MAX_CACHED_URLS = 1024

_log = structlog.get_logger("runner.api.client")


class BemHttp:
    """The connection pool (opened on first use) and the exchange of one request over it."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        limiter: RateLimiter | None,
        transport: httpx.AsyncBaseTransport | None,
        timeout: float,
        read_attempts: int,
        clock: Clock,
        rng: random.Random,
        on_response: Callable[[str, str, int | None], None] | None,
    ) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self.redactor = failures.Redactor(api_key)
        self._limiter = limiter
        self._transport = transport
        self._timeout = timeout
        self._read_attempts = read_attempts
        self._clock = clock
        self._rng = rng
        self._on_response = on_response
        self._http: httpx.AsyncClient | None = None
        self._closed = False
        self._urls: dict[tuple[str, tuple[tuple[str, str], ...]], httpx.URL] = {}
        """Absolute URLs of the paths POSTed to (one per workflow): parsed once, not per call."""

    async def aclose(self) -> None:
        """Close the connection pool; it cannot be used afterwards."""
        self._closed = True
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    def pool(self) -> httpx.AsyncClient:
        """The connection pool, opened on first use."""
        if self._closed:
            raise RuntimeError("BemClient is closed")
        if self._http is None:
            # aiohttp (runner.api.transport) unless a transport is given; loaded only here.
            if self._transport is None:
                from runner.api.transport import AiohttpClient

                client_class: type[httpx.AsyncClient] = AiohttpClient
            else:
                client_class = CookielessClient
            try:
                self._http = client_class(
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

    def json_request(
        self, path: str, document: Mapping[str, object], *, params: Mapping[str, str] | None = None
    ) -> httpx.Request:
        body = encoding.encode_json(document)
        # A small body goes out in one write; a large one part by part, never copied whole.
        content = body.joined() if body.length <= SMALL_BODY_BYTES else body
        return self.pool().build_request(
            "POST",
            self._url(path, params),
            content=content,
            headers={
                "content-type": "application/json",
                # Set explicitly so the parts go out as one sized body, not chunked.
                "content-length": str(body.length),
            },
        )

    def _url(self, path: str, params: Mapping[str, str] | None) -> httpx.URL:
        """``path`` and ``params`` on the base URL, as httpx would join them."""
        key = (path, tuple(sorted((params or {}).items())))
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= MAX_CACHED_URLS:
                self._urls.clear()
            url = self._urls[key] = self.pool().build_request("POST", path, params=params).url
        return url

    async def read(
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
            request = self.pool().build_request("GET", path, params=params)
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
            response = await self.exchange(request, route=route, kind="poll", creates=False)
        except TransientError as exc:
            return _Retry(exc)
        if not response.is_success:
            error = self._status_error(response, creates=False)
            if not failures.should_retry(response):
                raise error
            return _Retry(_as_transient(error))
        try:
            return parse(response, model, creates=False)
        except TransientError as exc:
            return _Retry(exc)

    def _slot(self, kind: str) -> AbstractAsyncContextManager[object]:
        if self._limiter is None:
            return contextlib.nullcontext()
        return self._limiter.slot(kind)

    async def exchange(
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
            response = await self.pool().send(request)
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
                exc, where=failures.target(request), creates=creates, redactor=self.redactor
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

    def raise_for_status(self, response: httpx.Response, *, creates: bool) -> None:
        if not response.is_success:
            raise self._status_error(response, creates=creates)

    def _status_error(self, response: httpx.Response, *, creates: bool) -> ApiError:
        what = f"{failures.target(response.request)}: HTTP {response.status_code}"
        detail = self.redactor.redact(failures.error_detail(response.content))
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


def parse(response: httpx.Response, model: type[_ModelT], *, creates: bool) -> _ModelT:
    try:
        return model.from_json(response.content)
    except UNREADABLE as exc:
        message = (
            f"{failures.target(response.request)}: HTTP {response.status_code} "
            f"with a body that is not a valid {model.__name__}"
        )
        if creates:
            raise OutcomeUnknownError(
                message + failures.MAYBE_CREATED, status_code=response.status_code
            ) from exc
        raise TransientError(message, status_code=response.status_code) from exc
