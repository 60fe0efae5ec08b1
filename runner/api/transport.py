"""The default HTTP transport: aiohttp's connection pool under httpx's API (``httpx-aiohttp``).

httpx's own transport spends about two and a half times the CPU per request (httpcore checks
every pooled connection on every request; ``bench/transport.py``). This module is imported only
when a client opens its pool, so a command that never talks to bem never loads aiohttp.

aiohttp's failures leave here as httpx's transport errors, chosen so that
:func:`runner.api.failures.transport_error` reads them right. Only a failure that certainly
happened before a byte of the request left is "never sent" (``ConnectError``,
``ConnectTimeout``, ``ProxyError``); a server that hangs up or cuts its answer short is a
``RemoteProtocolError`` (as httpx's own transport says) and a reset a ``ReadError``, so a POST
that met them stays outcome-unknown. (``httpx-aiohttp``'s own table reads every
``ClientConnectionError``, a dropped connection included, as a ``ConnectTimeout``: a POST would
be resent blindly.)
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

from runner.api.cookieless import CookielessClient

__all__ = ["AiohttpClient", "MappedAiohttpTransport", "httpx_error"]

# httpx's own defaults, which httpx passes in anyway.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
# A pooled connection idle longer than this is not reused. Servers close idle connections (the
# emulator's uvicorn after 5 s) and aiohttp, unlike httpcore, does not look at a connection
# before reusing it: a POST sent as the server closes it fails and ends outcome-unknown.
IDLE_CONNECTION_SECONDS = 2.0


def _short_idle(limits: httpx.Limits) -> httpx.Limits:
    expiry = limits.keepalive_expiry
    return httpx.Limits(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=IDLE_CONNECTION_SECONDS
        if expiry is None
        else min(expiry, IDLE_CONNECTION_SECONDS),
    )


def httpx_error(exc: BaseException) -> httpx.TransportError:
    """The httpx transport error that says what an aiohttp failure means for the request."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return httpx.ProxyError(message)
    # Refused, unresolvable, TLS refused: no connection, so nothing was sent.
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerFingerprintMismatch):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.NonHttpUrlClientError | aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message)
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return httpx.ReadTimeout(message)
    # The server hung up mid-answer, cut the body short or sent what is not HTTP.
    broken = aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError
    if isinstance(exc, broken | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message)
    # A reset, anything else on an open connection: the request may have gone.
    return httpx.ReadError(message)


def _cause(exc: BaseException) -> BaseException:
    """The aiohttp failure behind an error ``httpx-aiohttp`` has already translated."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError | TimeoutError):
        return cause
    return exc


class _MappedStream(httpx.AsyncByteStream):
    """A response body whose read failures are mapped like the request's own."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            cause = _cause(exc)
            raise httpx_error(cause) from cause

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            cause = _cause(exc)
            raise httpx_error(cause) from cause


class MappedAiohttpTransport(AiohttpTransport):
    """``httpx-aiohttp``'s transport with the failure mapping above."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            cause = _cause(exc)
            raise httpx_error(cause) from cause
        stream = response.stream
        if isinstance(stream, httpx.AsyncByteStream):
            response.stream = _MappedStream(stream)
        return response


class AiohttpClient(CookielessClient, HttpxAiohttpClient):
    """An ``httpx.AsyncClient`` whose transports (direct or through a proxy) are aiohttp's, and
    that keeps no cookies."""

    def _init_transport(
        self,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
        **kwargs: Any,
    ) -> httpx.AsyncBaseTransport:
        if transport is not None:
            return transport
        return MappedAiohttpTransport(
            verify=verify, cert=cert, trust_env=trust_env, http1=http1, limits=_short_idle(limits)
        )

    def _init_proxy_transport(
        self,
        proxy: httpx.Proxy,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        **kwargs: Any,
    ) -> httpx.AsyncBaseTransport:
        return MappedAiohttpTransport(
            verify=verify,
            cert=cert,
            trust_env=trust_env,
            http1=http1,
            limits=_short_idle(limits),
            proxy=proxy,
        )
