"""The webhook receiver: bem says when a call's outputs exist; the poller confirms.

An ASGI app served by uvicorn as one task of the runner (``run`` and ``drain``) when
``[webhook] listen`` is set. A delivery is accepted only as a POST to ``webhook.path`` whose
``bem-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` matches the raw
bytes under the current or the previous secret (any ``v1=`` entry; compared in constant time)
with ``t`` within ``tolerance_seconds`` of the clock's wall time. Anything else is refused with
no detail (401; 405 for another method, 413 for a body over :data:`MAX_BODY_BYTES`) and logged at
warning without the body. An accepted event is recorded in the store (once per ``eventID``)
before it is answered 2xx; it never writes a document: it marks its call for confirmation
(:mod:`runner.webhook_policy`). Pending events for calls this runner never made are dropped
after :data:`UNMATCHED_EVENT_SECONDS` and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import socket
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Literal

import anyio
import msgspec
import structlog
import uvicorn
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from runner.context import Context
from runner.credentials import Secret
from runner.errors import ConfigError, StoreError
from runner.store.base import WebhookEvent
from runner.webhook_policy import CONFIRM_WINDOW_SECONDS, EventFlow

log = structlog.get_logger("runner.webhook")

SIGNATURE_HEADER = "bem-signature"
MAX_BODY_BYTES = 1_000_000
MAX_TIMESTAMP_DIGITS = 12
MAX_ID_CHARS = 1024
UNMATCHED_EVENT_SECONDS = 3600.0
"""An event whose call this runner has not recorded after this long is dropped."""
KEEP_EVENT_IDS_SECONDS = 7 * 86_400.0
"""EventIDs are remembered this long, so a late redelivery is still recognised."""
HOUSEKEEPING_SECONDS = 60.0
GRACEFUL_SHUTDOWN_SECONDS = 2
_MAC = re.compile(r"[0-9a-fA-F]{64}")

Verdict = Literal["ok", "unsigned", "malformed", "stale", "future", "mismatch"]


# -- signatures, as pure functions ------------------------------------------------------------


class Signature(msgspec.Struct, frozen=True):
    timestamp: int
    macs: tuple[str, ...]


def parse_signature(header: str | None) -> Signature | None:
    """``t=<digits>`` once and at least one ``v1=<64 hex>``; other schemes are ignored."""
    if header is None:
        return None
    timestamps: list[str] = []
    macs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return None
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            if not _MAC.fullmatch(value):
                return None
            macs.append(value.lower())
    if len(timestamps) != 1 or not macs:
        return None
    stamp = timestamps[0]
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > MAX_TIMESTAMP_DIGITS:
        return None
    return Signature(int(stamp), tuple(macs))


def expected_mac(secret: str, timestamp: int, body: bytes) -> str:
    signed = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """A ``bem-signature`` value, as bem makes it (for tests and the emulator)."""
    return f"t={timestamp},v1={expected_mac(secret, timestamp, body)}"


def verify(
    header: str | None,
    body: bytes,
    secrets: Sequence[Secret],
    *,
    now: float,
    tolerance: float,
) -> Verdict:
    """Whether ``body`` came from bem: signed under one of ``secrets``, recently enough."""
    if header is None or not header.strip():
        return "unsigned"
    signature = parse_signature(header)
    if signature is None:
        return "malformed"
    if signature.timestamp < now - tolerance:
        return "stale"
    if signature.timestamp > now + tolerance:
        return "future"
    matched = False
    for secret in secrets:
        wanted = expected_mac(secret.get_secret_value(), signature.timestamp, body)
        for mac in signature.macs:
            matched |= hmac.compare_digest(wanted, mac)
    return "ok" if matched else "mismatch"


def parse_event(body: bytes) -> WebhookEvent | None:
    """The fields the runner keeps from an event; None if it is not an event at all."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    event_id, event_type = data.get("eventID"), data.get("eventType")
    call_id, reference_id = data.get("callID"), data.get("referenceID")
    if not (isinstance(event_id, str) and _short_text(event_id)):
        return None
    if not (isinstance(event_type, str) and _short_text(event_type)):
        return None
    if not _optional_text(call_id) or not _optional_text(reference_id):
        return None
    return WebhookEvent(event_id, event_type, call_id, reference_id)


def _short_text(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _optional_text(value: object) -> bool:
    return value is None or _short_text(value)


def split_listen(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``:port`` (all interfaces) → (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


# -- the receiver -----------------------------------------------------------------------------


def add_receiver(ctx: Context, stages: dict[str, Callable[[], Awaitable[None]]]) -> None:
    """With ``[webhook] listen`` set: the receiver is one more stage, and the poller's schedule
    follows what it hears."""
    webhook = ctx.config.webhook
    if webhook.listen is None:
        return
    ctx.webhook_flow = EventFlow(
        overdue_after=webhook.overdue_after,
        safety_net=webhook.safety_net,
        listening_since=ctx.clock.wall(),
    )
    stages["webhook"] = Receiver(ctx, ctx.webhook_flow).run


class Receiver:
    def __init__(self, ctx: Context, flow: EventFlow) -> None:
        self._ctx = ctx
        self._flow = flow
        self._slots = anyio.CapacityLimiter(ctx.config.webhook.max_concurrency)

    async def run(self) -> None:
        """Serve until the runner stops; tidy the recorded events meanwhile."""
        ctx = self._ctx
        assert ctx.config.webhook.listen is not None
        sock = listening_socket(ctx.config.webhook.listen)
        config = uvicorn.Config(
            self,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            limit_concurrency=4 * ctx.config.webhook.max_concurrency,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        server = _EmbeddedServer(config)
        host, port = sock.getsockname()[:2]
        log.info("webhook receiver listening", host=host, port=port, path=ctx.config.webhook.path)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(server.serve, [sock])
                await self._housekeeping()
                server.should_exit = True
        finally:
            sock.close()

    async def _housekeeping(self) -> None:
        ctx = self._ctx
        while not ctx.stopping.is_set():
            now = ctx.clock.wall()
            try:
                dropped = await ctx.store.expire_webhook_events(
                    received_before=now - UNMATCHED_EVENT_SECONDS,
                    purge_before=now - KEEP_EVENT_IDS_SECONDS,
                )
            except StoreError as exc:
                log.error("could not tidy webhook events; will retry", error=str(exc))
                dropped = 0
            if dropped:
                self._flow.dropped += dropped
                log.warning(
                    "dropped webhook events for calls this runner never made",
                    events=dropped,
                    total=self._flow.dropped,
                )
            await ctx.clock.wait(ctx.stopping, HOUSEKEEPING_SECONDS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != self._ctx.config.webhook.path:
            await _answer(send, 404)
        elif scope["method"] != "POST":
            await _answer(send, 405, [(b"allow", b"POST")])
        else:
            await _answer(send, await self._delivery(scope, receive))

    async def _delivery(self, scope: Scope, receive: Receive) -> int:
        headers = Headers(scope=scope)
        client = _client(scope)
        body = await _read_body(headers, receive)
        if body is None:
            log.warning("webhook refused: body too large", client=client, limit=MAX_BODY_BYTES)
            return 413
        ctx = self._ctx
        verdict = verify(
            headers.get(SIGNATURE_HEADER),
            body,
            ctx.config.webhook_secrets,
            now=ctx.clock.wall(),
            tolerance=ctx.config.webhook.tolerance_seconds,
        )
        if verdict != "ok":
            log.warning("webhook refused", reason=verdict, client=client, bytes=len(body))
            return 401
        event = parse_event(body)
        if event is None:
            log.warning("webhook refused: signed but not an event", client=client)
            return 400
        return await self._record(event)

    async def _record(self, event: WebhookEvent) -> int:
        ctx = self._ctx
        async with self._slots:
            now = ctx.clock.wall()
            try:
                recorded = await ctx.store.record_webhook_event(
                    event, now=now, confirm_at=now + CONFIRM_WINDOW_SECONDS
                )
            except StoreError as exc:
                log.error(
                    "could not record a webhook event", eventID=event.event_id, error=str(exc)
                )
                return 503
        if not recorded.duplicate:
            self._flow.heard(now, recorded.submitted_at)
        if recorded.call_row_id is not None:
            ctx.nudges.poll.set()
        log.debug(
            "webhook event",
            eventID=event.event_id,
            eventType=event.event_type,
            callID=event.call_id,
            duplicate=recorded.duplicate,
            marked=recorded.call_row_id is not None,
        )
        return 200


def listening_socket(address: str) -> socket.socket:
    host, port = split_listen(address)
    try:
        family, kind, proto, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"webhook.listen: cannot listen on {address}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"webhook.listen: cannot listen on {address}: {exc.strerror}") from exc
    return sock


async def _read_body(headers: Headers, receive: Receive) -> bytes | None:
    """The whole body, or None once it is over :data:`MAX_BODY_BYTES`."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(
    send: Send, status: int, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", b"0"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


class _EmbeddedServer(uvicorn.Server):
    """Leaves SIGINT/SIGTERM to the runner, which stops the receiver itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield
