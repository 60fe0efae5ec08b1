"""The default transport (aiohttp under httpx): each aiohttp failure read as what it means for
the request. Only a failure before any byte left is "never sent"; a POST that met any other is
outcome-unknown, never resent blindly. Real loopback servers that hang up or reset, and the
whole table of aiohttp's failure classes."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import aiohttp
import anyio
import httpx
import pytest
import yarl
from anyio.abc import SocketStream
from multidict import CIMultiDict, CIMultiDictProxy

from runner.api import BemClient, UploadFile
from runner.api import failures as api_failures
from runner.api.transport import httpx_error
from runner.clock import FakeClock
from runner.errors import OutcomeUnknownError, TransientError

pytestmark = pytest.mark.anyio

API_KEY = "sk-live-transport-test-1234567890"
REQUEST_END = b"\r\n\r\n"
RECEIVE_BYTES = 65536


def _request_info() -> aiohttp.RequestInfo:
    url = yarl.URL("http://127.0.0.1/v3/calls")
    return aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url)


# Every aiohttp failure that can happen once a connection is open: the request may have gone.
MAY_HAVE_GONE: list[aiohttp.ClientError] = [
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    aiohttp.ClientOSError(104, "Connection reset by peer"),
    aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
    aiohttp.ClientConnectionError("Connection closed"),
    aiohttp.ServerConnectionError("closed"),
    aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
    aiohttp.ServerTimeoutError("timeout"),
    aiohttp.ClientResponseError(_request_info(), (), status=400, message="Invalid HTTP"),
    aiohttp.ClientError("anything else"),
]
# Failures before a connection exists: nothing was sent.
NEVER_SENT: list[aiohttp.ClientError] = [
    aiohttp.ConnectionTimeoutError("Connection timeout to host"),
    aiohttp.ServerFingerprintMismatch(b"expected", b"got", "bem.test", 443),
]


@pytest.mark.parametrize("failure", MAY_HAVE_GONE, ids=lambda failure: type(failure).__name__)
def test_a_failure_on_an_open_connection_leaves_a_post_outcome_unknown(
    failure: aiohttp.ClientError,
) -> None:
    mapped = httpx_error(failure)
    error = api_failures.transport_error(
        mapped, where="POST http://bem.test/v2/calls", creates=True, redactor=_redactor()
    )
    read_error = api_failures.transport_error(
        mapped, where="GET http://bem.test/v3/calls", creates=False, redactor=_redactor()
    )

    assert isinstance(error, OutcomeUnknownError)
    assert isinstance(read_error, TransientError)
    assert not isinstance(mapped, httpx.ConnectError | httpx.ConnectTimeout | httpx.ProxyError)


@pytest.mark.parametrize("failure", NEVER_SENT, ids=lambda failure: type(failure).__name__)
def test_a_failure_before_connecting_is_never_sent(failure: aiohttp.ClientError) -> None:
    error = api_failures.transport_error(
        httpx_error(failure),
        where="POST http://bem.test/v2/calls",
        creates=True,
        redactor=_redactor(),
    )

    assert isinstance(error, TransientError)
    assert not isinstance(error, OutcomeUnknownError)


def _redactor() -> api_failures.Redactor:
    return api_failures.Redactor(API_KEY)


# -- real sockets: servers that hang up ----------------------------------------------------------


async def _read_request(stream: SocketStream) -> bytes:
    received = b""
    while REQUEST_END not in received:
        received += await stream.receive(RECEIVE_BYTES)
    return received


def _hang_up(stream: SocketStream) -> None:
    """Close without a word (FIN)."""


def _reset(stream: SocketStream) -> None:
    """Close with an RST: linger on, zero seconds."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@asynccontextmanager
async def loopback_server(serve: Callable[[SocketStream], Awaitable[None]]) -> AsyncIterator[str]:
    """A server on a free loopback port, each connection to ``serve``; yields its base URL."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, serve)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tasks.cancel_scope.cancel()


def closing_server(
    how: Callable[[SocketStream], None], seen: list[bytes]
) -> AbstractAsyncContextManager[str]:
    """A loopback server that reads each request whole, then closes as ``how`` says."""

    async def serve(stream: SocketStream) -> None:
        async with stream:
            seen.append(await _read_request(stream))
            how(stream)

    return loopback_server(serve)


@pytest.mark.parametrize(
    ("how", "cause"),
    [(_hang_up, httpx.RemoteProtocolError), (_reset, httpx.ReadError)],
    ids=["hang-up", "reset"],
)
async def test_a_server_closing_after_the_request_leaves_a_post_outcome_unknown(
    how: Callable[[SocketStream], None],
    cause: type[httpx.TransportError],
    clock: FakeClock,
    upload: UploadFile,
) -> None:
    seen: list[bytes] = []
    async with (
        closing_server(how, seen) as base_url,
        BemClient(base_url=base_url, api_key=API_KEY, clock=clock, read_attempts=1) as bem,
    ):
        with pytest.raises(OutcomeUnknownError) as on_post:
            await bem.invoke_workflow("wf", [upload], call_reference_id="cut", batch=False)
        with pytest.raises(TransientError) as on_get:
            await bem.get_call("c1")

    assert isinstance(on_post.value.__cause__, cause)
    assert isinstance(on_post.value.__cause__.__cause__, aiohttp.ClientError)
    assert not isinstance(on_get.value, OutcomeUnknownError)
    methods = [request.split(b" ", 1)[0] for request in seen]
    # aiohttp itself tries an idempotent GET once more on a fresh connection; never a POST.
    assert methods[0] == b"POST"
    assert methods.count(b"POST") == 1
    assert set(methods[1:]) == {b"GET"}
    assert API_KEY not in str(on_post.value)


# -- cookies: none kept --------------------------------------------------------------------------

SETS_A_COOKIE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"set-cookie: session=abc123; Path=/\r\ncontent-length: 12\r\n\r\n"
    b'{"calls":[]}'
)


def cookie_setting_server(seen: list[bytes]) -> AbstractAsyncContextManager[str]:
    """A loopback server answering every request on a connection with a ``set-cookie``."""

    async def serve(stream: SocketStream) -> None:
        async with stream:
            while True:
                try:
                    seen.append(await _read_request(stream))
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                await stream.send(SETS_A_COOKIE)

    return loopback_server(serve)


async def test_the_default_client_sends_back_no_cookie_a_server_set(clock: FakeClock) -> None:
    seen: list[bytes] = []
    async with (
        cookie_setting_server(seen) as base_url,
        BemClient(base_url=base_url, api_key=API_KEY, clock=clock) as bem,
    ):
        for _ in range(3):
            assert await bem.list_calls() == []

    assert len(seen) == 3
    assert [b"cookie:" in request.lower() for request in seen] == [False] * 3


async def test_a_client_on_a_given_transport_sends_back_no_cookie_either() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"calls": []}, headers={"set-cookie": "session=abc123"})

    transport = httpx.MockTransport(answer)
    async with BemClient(base_url="http://bem.test", api_key=API_KEY, transport=transport) as bem:
        for _ in range(3):
            await bem.list_calls()

    assert [request.headers.get("cookie") for request in seen] == [None] * 3
