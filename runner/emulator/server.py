"""Serving an emulator over real HTTP with uvicorn, inside the caller's event loop."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator

import anyio
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from runner.emulator.emulator import Emulator
from runner.emulator.errors import EmulatorError
from runner.emulator.faults import ConnectionDropped

# Requests still running when the server stops (e.g. a wait=true on a frozen fake clock) are
# cancelled after this long.
GRACEFUL_SHUTDOWN_SECONDS = 2
_INCOMPLETE_RESPONSE_LOG = "ASGI callable returned without completing response."


@contextlib.asynccontextmanager
async def serve_emulator(
    emulator: Emulator, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``emulator`` on ``host:port`` (0: a free port) and yield its base URL.

    The socket is bound and listening before the URL is yielded, so clients may connect at
    once. Webhook deliveries are sent while it serves. Leaving the block stops the server.
    Signals are left to the embedding program.
    """
    sock = _listen(host, port)
    config = uvicorn.Config(
        _DroppedConnectionsClose(emulator.app),
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _EmbeddedServer(config)
    drop_filter = _IntentionalDropFilter()
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addFilter(drop_filter)
    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(server.serve, [sock])
            deliveries = anyio.CancelScope()
            task_group.start_soon(_run_in, deliveries, emulator.deliveries.run)
            try:
                yield _base_url(host, sock.getsockname()[1])
            finally:
                deliveries.cancel()
                server.should_exit = True
    finally:
        uvicorn_logger.removeFilter(drop_filter)
        sock.close()


async def _run_in(scope: anyio.CancelScope, work: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await work()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise EmulatorError(f"cannot serve the emulator on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise EmulatorError(f"cannot serve the emulator on {host}:{port}: {exc}") from exc
    return sock


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to the program it runs in."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _DroppedConnectionsClose:
    """Turns :class:`ConnectionDropped` into a plain return: uvicorn then closes the socket
    with the response incomplete, which is exactly what the client should see."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(ConnectionDropped):
            await self._app(scope, receive, send)


class _IntentionalDropFilter(logging.Filter):
    """Keeps uvicorn from reporting the emulator's deliberate drops as errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _INCOMPLETE_RESPONSE_LOG
