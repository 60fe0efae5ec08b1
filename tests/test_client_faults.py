"""How BemClient classifies and retries failures: the emulator's fault knobs, real sockets for
dropped connections, timeouts and refused connections, and a stand-in server for the statuses
the emulator never sends."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
import httpx
import pytest
import structlog

from runner.api import BemClient, CallFilter, UploadFile, V2CallRequest
from runner.clock import FakeClock
from runner.emulator import Emulator, EmulatorSettings, serve_emulator
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

pytestmark = pytest.mark.anyio

API_KEY = "sk-live-faults-test-9876543210"
BASE_URL = "http://bem.test"
INVOKE = "POST /v3/workflows/{workflowName}/call"
GET_CALL = "GET /v3/calls/{callID}"
T = TypeVar("T")


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def emulator(clock: FakeClock) -> Emulator:
    settings = EmulatorSettings(api_key=API_KEY, latency_min=3.0, latency_max=3.0)
    return Emulator(settings, clock=clock.now)


def make_client(
    base_url: str,
    clock: FakeClock,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    api_key: str = API_KEY,
    read_attempts: int = 3,
    timeout: float = 60.0,
) -> BemClient:
    return BemClient(
        base_url=base_url,
        api_key=api_key,
        transport=transport,
        clock=clock,
        read_attempts=read_attempts,
        timeout=timeout,
        rng=random.Random(11),
    )


@pytest.fixture
async def client(emulator: Emulator, clock: FakeClock) -> AsyncIterator[BemClient]:
    transport = httpx.ASGITransport(app=emulator.app)
    async with make_client(BASE_URL, clock, transport=transport) as bem:
        yield bem


def requests_to(emulator: Emulator, route: str) -> dict[str, int]:
    requests: dict[str, dict[str, int]] = emulator.stats()["requests"]
    return requests.get(route, {})


def count(emulator: Emulator, route: str) -> int:
    return sum(requests_to(emulator, route).values())


class TimeDriver:
    """Runs an operation while moving a FakeClock to each sleeper's deadline, noting each wait."""

    def __init__(self, clock: FakeClock, on_wait: Callable[[int], None] | None = None) -> None:
        self._clock = clock
        self._on_wait = on_wait
        self.waits: list[float] = []

    async def run(self, operation: Awaitable[T]) -> T:
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._keep_advancing)
                try:
                    return await operation
                finally:
                    tasks.cancel_scope.cancel()
        except ExceptionGroup as group:
            # Raise the operation's own error, as a caller without this driver would see it.
            [error] = group.exceptions
            raise error from error.__cause__
        raise AssertionError("unreachable: the task group either returned or raised")

    async def _keep_advancing(self) -> None:
        while True:
            await self._clock.wait_for_sleepers(1)
            self.waits.append((self._clock.next_deadline or 0.0) - self._clock.now())
            if self._on_wait is not None:
                self._on_wait(len(self.waits))
            self._clock.advance_to_next_deadline()


def stand_in(status: int, body: bytes, seen: list[httpx.Request]) -> httpx.MockTransport:
    """A server that answers every request with ``status`` and ``body``, noting each request."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    return httpx.MockTransport(answer)


# -- 4xx -----------------------------------------------------------------------------------------


async def test_rejected_key_is_an_auth_error_that_never_shows_the_key(
    emulator: Emulator, clock: FakeClock, upload: UploadFile
) -> None:
    wrong_key = "sk-live-WRONG-key-abcdef"
    transport = httpx.ASGITransport(app=emulator.app)
    errors: list[ApiError] = []
    with structlog.testing.capture_logs() as logs:
        async with make_client(BASE_URL, clock, transport=transport, api_key=wrong_key) as bem:
            with pytest.raises(AuthError) as on_get:
                await bem.get_call("call_1")
            with pytest.raises(AuthError) as on_post:
                await bem.invoke_workflow("wf", [upload], call_reference_id="a", batch=False)
            errors += [on_get.value, on_post.value]
            shown = [repr(bem), json.dumps(logs, default=str)]

    assert [error.status_code for error in errors] == [401, 401]
    assert count(emulator, GET_CALL) == 1  # an auth failure is not retried
    shown += [text for error in errors for text in (str(error), repr(error), repr(error.args))]
    assert all(wrong_key not in text for text in shown)


async def test_a_key_echoed_by_the_server_is_redacted(clock: FakeClock) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": f"key {request.headers['x-api-key']} revoked"})

    async with make_client(BASE_URL, clock, transport=httpx.MockTransport(answer)) as bem:
        with pytest.raises(AuthError) as caught:
            await bem.list_calls()

    assert caught.value.status_code == 403
    assert API_KEY not in str(caught.value)
    assert "key [redacted] revoked" in str(caught.value)


async def test_unknown_workflow_is_not_found(
    client: BemClient, emulator: Emulator, upload: UploadFile
) -> None:
    with pytest.raises(NotFoundError, match="unknown-flow") as caught:
        await client.invoke_workflow("unknown-flow", [upload], call_reference_id="nf", batch=False)

    assert caught.value.status_code == 404
    assert emulator.stats()["calls_total"] == 0


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, PermanentError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (413, PermanentError),
        (422, PermanentError),
    ],
)
async def test_client_errors_are_final_for_reads_and_writes(
    clock: FakeClock, upload: UploadFile, status: int, expected: type[ApiError]
) -> None:
    seen: list[httpx.Request] = []
    transport = stand_in(status, b'{"error": "bem says no"}', seen)
    async with make_client(BASE_URL, clock, transport=transport) as bem:
        with pytest.raises(expected, match="bem says no") as on_get:
            await bem.get_call_v2("c1")
        with pytest.raises(expected, match="bem says no") as on_post:
            await bem.create_calls_v2([V2CallRequest("wf", "r", (upload,))])

    assert type(on_get.value) is expected
    assert type(on_post.value) is expected
    assert on_get.value.status_code == on_post.value.status_code == status
    assert len(seen) == 2  # neither was retried


# -- 429 -----------------------------------------------------------------------------------------


async def test_429_carries_retry_after_in_seconds(emulator: Emulator, client: BemClient) -> None:
    emulator.update(rate_limit_rps=1.0, rate_limit_burst=1)
    await client.list_calls()

    async with make_client(
        BASE_URL, FakeClock(), transport=httpx.ASGITransport(app=emulator.app), read_attempts=1
    ) as single_try:
        with pytest.raises(RateLimitedError) as caught:
            await single_try.list_calls()

    assert caught.value.status_code == 429
    assert caught.value.retry_after == 1.0


async def test_429_carries_retry_after_given_as_an_http_date(emulator: Emulator) -> None:
    emulator.update(rate_limit_rps=1.0, rate_limit_burst=1, retry_after_format="http-date")
    # The emulator dates its Retry-After from the real wall clock, so this clock starts there.
    wall_clock = FakeClock(wall_start=time.time())
    transport = httpx.ASGITransport(app=emulator.app)
    async with make_client(BASE_URL, wall_clock, transport=transport, read_attempts=1) as bem:
        await bem.list_calls()
        with pytest.raises(RateLimitedError) as caught:
            await bem.list_calls()

    # The date is whole seconds, rounded up from "now + 1 s".
    assert caught.value.retry_after is not None
    assert 1.0 <= caught.value.retry_after <= 2.5


async def test_a_read_waits_out_retry_after_and_then_succeeds(
    emulator: Emulator, client: BemClient, clock: FakeClock
) -> None:
    emulator.update(rate_limit_rps=0.25, rate_limit_burst=1)
    await client.list_calls()
    driver = TimeDriver(clock)

    calls = await driver.run(client.list_calls())

    assert calls == []
    assert requests_to(emulator, "GET /v3/calls") == {"200": 2, "429": 1}
    assert driver.waits[0] >= 4.0  # Retry-After: 4, not the much shorter backoff


async def test_a_rate_limited_post_created_nothing_and_was_sent_once(
    emulator: Emulator, client: BemClient, upload: UploadFile
) -> None:
    emulator.update(rate_limit_rps=1.0, rate_limit_burst=1)
    await client.list_calls()

    with pytest.raises(RateLimitedError) as caught:
        await client.invoke_workflow("wf", [upload], call_reference_id="rl", batch=False)

    assert caught.value.retry_after == 1.0
    assert requests_to(emulator, INVOKE) == {"429": 1}
    assert emulator.stats()["calls_total"] == 0


# -- 5xx and read retries ------------------------------------------------------------------------


async def test_reads_give_up_after_read_attempts_with_growing_jittered_waits(
    emulator: Emulator, client: BemClient, clock: FakeClock
) -> None:
    emulator.update(error_5xx_rate=1.0)
    driver = TimeDriver(clock)

    with pytest.raises(TransientError) as caught:
        await driver.run(client.get_call("call_1"))

    assert caught.value.status_code in (500, 502, 503)
    assert count(emulator, GET_CALL) == 3  # read_attempts
    assert len(driver.waits) == 2
    assert 0 <= driver.waits[0] <= 0.5
    assert 0 <= driver.waits[1] <= 1.0


async def test_reads_recover_once_the_server_does(
    emulator: Emulator, client: BemClient, clock: FakeClock, upload: UploadFile
) -> None:
    created = await client.invoke_workflow("wf", [upload], call_reference_id="ok", batch=False)
    emulator.update(error_5xx_rate=1.0)

    def heal_after_second_failure(waits: int) -> None:
        if waits == 2:
            emulator.update(error_5xx_rate=0.0)

    driver = TimeDriver(clock, on_wait=heal_after_second_failure)
    fetched = await driver.run(client.get_call(created.call_id))

    assert fetched.call_id == created.call_id
    statuses = requests_to(emulator, GET_CALL)
    assert statuses.pop("200") == 1
    assert sum(statuses.values()) == 2


async def test_server_errors_on_a_post_are_outcome_unknown_and_never_retried(
    emulator: Emulator, client: BemClient, upload: UploadFile
) -> None:
    emulator.update(error_5xx_rate=1.0)

    with pytest.raises(OutcomeUnknownError) as on_v3:
        await client.invoke_workflow("wf", [upload], call_reference_id="x", batch=False)
    with pytest.raises(OutcomeUnknownError) as on_v2:
        await client.create_calls_v2([V2CallRequest("wf", "y", (upload,))])

    assert on_v3.value.status_code in (500, 502, 503)
    assert on_v2.value.status_code in (500, 502, 503)
    assert count(emulator, INVOKE) == 1
    assert count(emulator, "POST /v2/calls") == 1


async def test_accept_then_500_is_outcome_unknown_and_the_call_can_be_found(
    emulator: Emulator, client: BemClient, upload: UploadFile
) -> None:
    # No latency: the wait=true request finishes at once, then its 200 is swapped for a 500.
    emulator.update(accept_then_500_rate=1.0, latency_min=0.0, latency_max=0.0)

    with pytest.raises(OutcomeUnknownError, match="may have been created"):
        await client.invoke_workflow("wf", [upload], call_reference_id="ghost", batch=False)
    with pytest.raises(OutcomeUnknownError):
        await client.invoke_workflow(
            "wf", [upload], call_reference_id="ghost-wait", batch=False, wait=True
        )
    with pytest.raises(OutcomeUnknownError):
        await client.create_calls_v2([V2CallRequest("wf", "ghost-v2", (upload,))])

    assert requests_to(emulator, INVOKE) == {"500": 2}
    assert requests_to(emulator, "POST /v2/calls") == {"500": 1}
    found = await client.list_calls(CallFilter(reference_ids=["ghost", "ghost-wait", "ghost-v2"]))
    assert sorted(call.call_reference_id or "" for call in found) == [
        "ghost",
        "ghost-v2",
        "ghost-wait",
    ]


async def test_a_connection_dropped_mid_response_in_process(
    emulator: Emulator, client: BemClient, clock: FakeClock, upload: UploadFile
) -> None:
    emulator.update(drop_rate=1.0)

    with pytest.raises(OutcomeUnknownError) as on_post:
        await client.invoke_workflow("wf", [upload], call_reference_id="cut", batch=False)
    with pytest.raises(TransientError) as on_get:
        await TimeDriver(clock).run(client.list_calls())

    assert isinstance(on_post.value.__cause__, httpx.RemoteProtocolError)
    assert isinstance(on_get.value.__cause__, httpx.RemoteProtocolError)
    assert count(emulator, INVOKE) == 1
    assert count(emulator, "GET /v3/calls") == 3


# -- malformed answers and 408 (statuses the emulator does not send) -----------------------------


async def test_a_malformed_answer_to_a_read_is_transient_and_retried(clock: FakeClock) -> None:
    seen: list[httpx.Request] = []
    transport = stand_in(200, b"<html>gateway</html>", seen)
    async with make_client(BASE_URL, clock, transport=transport) as bem:
        with pytest.raises(TransientError, match="not a valid CallResponse"):
            await TimeDriver(clock).run(bem.get_call("c1"))

    assert len(seen) == 3


async def test_a_malformed_success_answer_to_a_post_is_outcome_unknown(
    clock: FakeClock, upload: UploadFile
) -> None:
    seen: list[httpx.Request] = []
    transport = stand_in(202, b'{"call": {"status": "pending"}}', seen)  # no callID
    async with make_client(BASE_URL, clock, transport=transport) as bem:
        with pytest.raises(OutcomeUnknownError):
            await bem.invoke_workflow("wf", [upload], call_reference_id="m", batch=False)

    assert len(seen) == 1


@pytest.mark.parametrize(
    "body",
    [
        b'{"calls": [{"callID": "c1", "outputs": [{"transformedContent": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}]}]}",
        b'{"calls": [{"callID": "c1", "status": 3}]}',
        b'{"calls": [{"callID": "c1"}]} trailing',
    ],
    ids=["nested too deep", "wrong type", "not JSON"],
)
async def test_an_unreadable_answer_to_a_read_is_transient_and_retried(
    clock: FakeClock, body: bytes
) -> None:
    seen: list[httpx.Request] = []
    transport = stand_in(200, body, seen)
    async with make_client(BASE_URL, clock, transport=transport) as bem:
        with pytest.raises(TransientError, match="not a valid CallList"):
            await TimeDriver(clock).run(bem.list_calls())

    assert len(seen) == 3


async def test_408_is_transient_for_reads_and_writes(clock: FakeClock, upload: UploadFile) -> None:
    seen: list[httpx.Request] = []
    transport = stand_in(408, b"", seen)
    async with make_client(BASE_URL, clock, transport=transport) as bem:
        with pytest.raises(TransientError) as on_get:
            await TimeDriver(clock).run(bem.get_call("c1"))
        with pytest.raises(TransientError) as on_post:
            await bem.invoke_workflow("wf", [upload], call_reference_id="t", batch=False)

    assert on_get.value.status_code == on_post.value.status_code == 408
    assert not isinstance(on_post.value, OutcomeUnknownError)
    assert [request.method for request in seen] == ["GET"] * 3 + ["POST"]


# -- real sockets --------------------------------------------------------------------------------


async def test_a_dropped_connection_over_http_is_outcome_unknown_for_a_post(
    clock: FakeClock, upload: UploadFile
) -> None:
    emulator = Emulator(EmulatorSettings(api_key=API_KEY, drop_rate=1.0), clock=clock.now)
    async with serve_emulator(emulator) as base_url, make_client(base_url, clock) as bem:
        with pytest.raises(OutcomeUnknownError) as on_post:
            await bem.invoke_workflow("wf", [upload], call_reference_id="dropped", batch=False)
        with pytest.raises(TransientError) as on_get:
            await TimeDriver(clock).run(bem.list_calls())
        emulator.update(drop_rate=0.0)
        found = await bem.list_calls(CallFilter(reference_ids=["dropped"]))

    assert isinstance(on_post.value.__cause__, httpx.RemoteProtocolError)
    assert isinstance(on_get.value.__cause__, httpx.RemoteProtocolError)
    assert [call.call_reference_id for call in found] == ["dropped"]
    assert requests_to(emulator, INVOKE) == {"dropped": 1}


async def test_a_read_timeout_is_outcome_unknown_for_a_post_and_transient_for_a_read(
    clock: FakeClock, upload: UploadFile
) -> None:
    settings = EmulatorSettings(api_key=API_KEY, slow_rate=1.0, slow_seconds=60.0)
    emulator = Emulator(settings, clock=clock.now)
    async with (
        serve_emulator(emulator) as base_url,
        make_client(base_url, clock, timeout=0.3, read_attempts=1) as bem,
    ):
        with pytest.raises(OutcomeUnknownError) as on_post:
            await bem.invoke_workflow("wf", [upload], call_reference_id="slow", batch=False)
        with pytest.raises(TransientError) as on_get:
            await bem.list_calls()
        emulator.advance(60.0)  # let the held responses go, so the server can stop at once
        emulator.update(slow_rate=0.0)
        found = await bem.list_calls(CallFilter(reference_ids=["slow"]))

    assert isinstance(on_post.value.__cause__, httpx.ReadTimeout)
    assert isinstance(on_get.value.__cause__, httpx.ReadTimeout)
    assert [call.call_reference_id for call in found] == ["slow"]


async def test_a_refused_connection_is_transient_even_for_a_post(
    clock: FakeClock, upload: UploadFile, refused_port: int
) -> None:
    async with make_client(f"http://127.0.0.1:{refused_port}", clock) as bem:
        with pytest.raises(TransientError) as on_post:
            await bem.invoke_workflow("wf", [upload], call_reference_id="c", batch=False)
        driver = TimeDriver(clock)
        with pytest.raises(TransientError) as on_get:
            await driver.run(bem.get_call("c1"))

    assert not isinstance(on_post.value, OutcomeUnknownError)
    assert isinstance(on_post.value.__cause__, httpx.ConnectError)
    assert isinstance(on_get.value.__cause__, httpx.ConnectError)
    assert len(driver.waits) == 2  # three attempts


async def test_an_unusable_base_url_is_a_config_error(clock: FakeClock) -> None:
    async with make_client("ftp://bem.test", clock) as bem:
        with pytest.raises(ConfigError, match="base URL"):
            await bem.list_calls()


async def test_a_closed_client_refuses_work(client: BemClient) -> None:
    await client.aclose()

    with pytest.raises(RuntimeError, match="closed"):
        await client.list_calls()
