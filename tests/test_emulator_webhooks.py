"""The emulator's webhooks: the SDK's shapes for the secret and subscriptions, and signed
deliveries over real HTTP with retries, drops, duplicates and reordering."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import bem
import httpx
import pytest
import uvicorn
from bem.types.subscription_v3 import SubscriptionV3
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from runner.emulator import Emulator, EmulatorSettings, serve_emulator

pytestmark = pytest.mark.anyio

KEY = "hooks-key"


@dataclass
class Collector:
    """A webhook receiver for the emulator to deliver to; answers ``fail_first`` 500s first."""

    fail_first: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        status = 500 if len(self.answered) < self.fail_first else 200
        self.answered.append(status)
        if status == 200:
            self.received.append((dict(request.headers), body))
        await Response(status_code=status)(scope, receive, send)


@asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(app, log_config=None, lifespan="off", access_log=False)
    server = _QuietServer(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        finally:
            server.should_exit = True
    sock.close()


class _QuietServer(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_emulator(**settings: Any) -> Emulator:
    values: dict[str, Any] = {"api_key": KEY, "latency_min": 0.0, "latency_max": 0.0}
    return Emulator(EmulatorSettings(**(values | settings)))


@asynccontextmanager
async def running(emulator: Emulator) -> AsyncIterator[tuple[bem.AsyncBem, httpx.AsyncClient]]:
    async with (
        serve_emulator(emulator) as base_url,
        httpx.AsyncClient(base_url=base_url, headers={"x-api-key": KEY}) as http,
        bem.AsyncBem(api_key=KEY, base_url=base_url, max_retries=0, http_client=http) as sdk,
    ):
        yield sdk, http


async def call(http: httpx.AsyncClient, content: bytes, workflow: str = "wf") -> str:
    body = {
        "input": {
            "singleFile": {"inputType": "text", "inputContent": base64.b64encode(content).decode()}
        },
        "callReferenceID": f"ref-{hashlib.sha256(content).hexdigest()[:8]}",
    }
    response = await http.post(f"/v3/workflows/{workflow}/call", json=body)
    assert response.status_code == 202, response.text
    call_id: str = response.json()["call"]["callID"]
    return call_id


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    parts = dict(part.split("=", 1) for part in headers["bem-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), parts["v1"])


async def test_secret_create_get_delete_with_the_sdk() -> None:
    async with running(make_emulator()) as (sdk, _):
        with pytest.raises(bem.NotFoundError):
            await sdk.webhook_secret.retrieve()
        first = await sdk.webhook_secret.create()
        assert (await sdk.webhook_secret.retrieve()).secret == first.secret
        second = await sdk.webhook_secret.create()
        assert second.secret != first.secret
        assert (await sdk.webhook_secret.retrieve()).secret == second.secret
        await sdk.webhook_secret.revoke()
        with pytest.raises(bem.NotFoundError):
            await sdk.webhook_secret.retrieve()


async def test_subscriptions_crud_and_listing_with_the_sdk() -> None:
    async with running(make_emulator()) as (sdk, http):
        made = [
            await sdk.subscriptions.create(
                name=f"s{n}", type="transform", function_name=f"fn-{n % 2}",
                webhook_url="https://example.com/hook",
            )
            for n in range(5)
        ]  # fmt: skip
        raw = (await http.get("/v3/subscriptions")).json()
        assert [SubscriptionV3.model_validate(item, strict=True).to_dict() for item in raw] == raw
        assert raw == [s.to_dict() for s in made]
        assert set(raw[0]) == {"subscriptionID", "name", "type", "functionName", "webhookURL"}
        only = await sdk.subscriptions.list(function_names=["fn-1"])
        assert [s.name for s in only] == ["s1", "s3"]
        page = await sdk.subscriptions.list(limit=2, starting_after=made[1].subscription_id)
        assert [s.name for s in page] == ["s2", "s3"]
        before = await sdk.subscriptions.list(limit=2, ending_before=made[3].subscription_id)
        assert [s.name for s in before] == ["s1", "s2"]
        desc = await http.get("/v3/subscriptions", params={"sortOrder": "desc", "limit": 2})
        assert [s["name"] for s in desc.json()] == ["s4", "s3"]
        changed = await sdk.subscriptions.update(made[0].subscription_id, disabled=True)
        assert (changed.disabled, changed.name) == (True, "s0")
        again = await sdk.subscriptions.retrieve(made[0].subscription_id)
        assert again.to_dict() == changed.to_dict()
        await sdk.subscriptions.delete(made[0].subscription_id)
        with pytest.raises(bem.NotFoundError):
            await sdk.subscriptions.retrieve(made[0].subscription_id)


@pytest.mark.parametrize(
    "body",
    [
        {"type": "transform"},
        {"name": "x"},
        {"name": "x", "type": "nonsense"},
        {"name": "x", "type": "error", "webhookURL": "ftp://x"},
        {"name": "x", "type": "error", "functionName": "a", "functionID": "b"},
        {"name": "x", "type": "error", "surprise": 1},
        {"name": "", "type": "error"},
    ],
)
async def test_bad_subscriptions_are_refused(body: dict[str, Any]) -> None:
    async with running(make_emulator()) as (_, http):
        assert (await http.post("/v3/subscriptions", json=body)).status_code == 400
        assert (await http.get("/v3/subscriptions")).json() == []


async def test_events_of_subscribed_functions_are_delivered_signed_after_retries() -> None:
    emulator = make_emulator(webhook_retry_base=0.01)
    collector = Collector(fail_first=2)
    async with serve_app(collector) as hook_url, running(emulator) as (sdk, http):
        secret = (await sdk.webhook_secret.create()).secret
        for kind in ("transform", "error"):
            await sdk.subscriptions.create(
                name=kind, type=kind, function_name="wf-transform", webhook_url=hook_url
            )
        ok = await call(http, b"good")
        bad = await call(http, b"BEM-EMULATOR-FAIL")
        await call(http, b"other workflow", workflow="unsubscribed")
        with anyio.fail_after(10):
            await emulator.deliveries.wait_idle()
    events = [json.loads(body) for _, body in collector.received]
    assert sorted((e["callID"], e["eventType"]) for e in events) == sorted(
        [(ok, "transform"), (bad, "error")]
    )
    assert all(verify(secret, headers, body) for headers, body in collector.received)
    assert collector.answered[:2] == [500, 500]
    stats = emulator.stats()["webhooks"]
    assert (stats["delivered"], stats["retried"]) == (2, 2)
    assert stats["attempts"] == {"500": 2, "200": 2}


async def test_unsigned_after_revoke_and_knobs_drop_and_duplicate() -> None:
    emulator = make_emulator(webhook_duplicate_rate=1.0)
    collector = Collector()
    async with serve_app(collector) as hook_url, running(emulator) as (sdk, http):
        await sdk.subscriptions.create(
            name="t", type="transform", function_name="wf-transform", webhook_url=hook_url
        )
        await call(http, b"twice")
        with anyio.fail_after(10):
            await emulator.deliveries.wait_idle()
        emulator.update(webhook_duplicate_rate=0.0, webhook_drop_rate=1.0)
        await call(http, b"never")
        with anyio.fail_after(10):
            await emulator.deliveries.wait_idle()
    assert len(collector.received) == 2
    assert all("bem-signature" not in headers for headers, _ in collector.received)
    assert len({json.loads(body)["eventID"] for _, body in collector.received}) == 1
    stats = emulator.stats()["webhooks"]
    assert (stats["duplicated"], stats["dropped"]) == (1, 1)


async def test_reordering_lets_later_events_overtake_earlier_ones() -> None:
    emulator = make_emulator(webhook_reorder_seconds=0.5, seed=3)
    collector = Collector()
    async with serve_app(collector) as hook_url, running(emulator) as (sdk, http):
        await sdk.subscriptions.create(
            name="t", type="transform", function_name="wf-transform", webhook_url=hook_url
        )
        sent = [await call(http, f"doc {n}".encode()) for n in range(12)]
        with anyio.fail_after(10):
            await emulator.deliveries.wait_idle()
    arrived = [json.loads(body)["callID"] for _, body in collector.received]
    assert sorted(arrived) == sorted(sent)
    assert arrived != sent
