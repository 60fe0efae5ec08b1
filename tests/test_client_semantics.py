"""BemClient's retry and response semantics next to the SDK's, driven by the emulator's knobs:
``x-should-retry``, ``retry-after-ms`` / ``Retry-After`` on any answer, 409, redirects,
``{"call": null}``, null event lists, item names a multipart form cannot carry, API keys no
header can carry, and error messages that name the URL but never a secret."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import bem
import httpx
import msgspec
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import names
from runner.api import BemClient, CallFilter, UploadFile
from runner.api import failures as api_failures
from runner.api.checks import call_mismatch
from runner.api.encoding import header_value_problem, portable_filename
from runner.api.models import Call
from runner.clock import FakeClock
from runner.emulator import Emulator, EmulatorSettings
from runner.errors import (
    ConfigError,
    NotFoundError,
    OutcomeUnknownError,
    PermanentError,
    RateLimitedError,
    TransientError,
)

pytestmark = pytest.mark.anyio

KEY = "sk-semantics-0123456789"
BASE_URL = "http://bem.test"
INVOKE = "POST /v3/workflows/{workflowName}/call"
GET_CALL = "GET /v3/calls/{callID}"
T = TypeVar("T")


@pytest.fixture
def emulator(clock: FakeClock) -> Emulator:
    settings = EmulatorSettings(api_key=KEY, latency_min=2.0, latency_max=2.0)
    return Emulator(settings, clock=clock.now)


class Recording(httpx.AsyncBaseTransport):
    """Passes requests on to another transport and keeps each one's method and Content-Type."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self.sent: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.headers.get("content-type", "")))
        return await self._inner.handle_async_request(request)


@pytest.fixture
def recording(emulator: Emulator) -> Recording:
    return Recording(httpx.ASGITransport(app=emulator.app))


@pytest.fixture
async def client(recording: Recording, clock: FakeClock) -> AsyncIterator[BemClient]:
    async with BemClient(
        base_url=BASE_URL,
        api_key=KEY,
        transport=recording,
        clock=clock,
        read_attempts=3,
        rng=random.Random(3),
    ) as bem_client:
        yield bem_client


def statuses(emulator: Emulator, route: str) -> dict[str, int]:
    requests: dict[str, dict[str, int]] = emulator.stats()["requests"]
    return requests.get(route, {})


async def advancing(
    clock: FakeClock, operation: Awaitable[T], on_wait: Callable[[float], None] | None = None
) -> T:
    """Await ``operation`` while moving ``clock`` to each sleeper's deadline in turn."""

    async def keep_advancing() -> None:
        while True:
            await clock.wait_for_sleepers(1)
            if on_wait is not None:
                on_wait((clock.next_deadline or 0.0) - clock.now())
            clock.advance_to_next_deadline()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(keep_advancing)
            try:
                return await operation
            finally:
                tasks.cancel_scope.cancel()
    except ExceptionGroup as group:
        [error] = group.exceptions
        raise error from error.__cause__
    raise AssertionError("unreachable")


# -- x-should-retry --------------------------------------------------------------------------------


async def test_a_read_answered_x_should_retry_false_is_tried_once(
    emulator: Emulator, client: BemClient
) -> None:
    emulator.update(error_5xx_rate=1.0, should_retry_header="false")

    with pytest.raises(PermanentError, match="x-should-retry: false"):
        await client.get_call("c1")

    assert sum(statuses(emulator, GET_CALL).values()) == 1


async def test_a_read_answered_400_with_x_should_retry_true_is_retried(
    emulator: Emulator, client: BemClient, clock: FakeClock
) -> None:
    emulator.update(error_rate=1.0, error_status=400, should_retry_header="true")

    with pytest.raises(TransientError) as caught:
        await advancing(clock, client.get_call("c1"))

    assert caught.value.status_code == 400
    assert statuses(emulator, GET_CALL) == {"400": 3}


@pytest.mark.parametrize("header", [None, "true", "false"])
@pytest.mark.parametrize("code", [200, 400, 401, 404, 408, 409, 422, 429, 500, 502, 599])
def test_the_retry_rule_is_the_sdks(header: str | None, code: int) -> None:
    sdk = bem.Bem(api_key=KEY, base_url=BASE_URL)
    headers = {} if header is None else {"x-should-retry": header}
    response = httpx.Response(code, headers=headers)
    assert api_failures.should_retry(response) == sdk._should_retry(response)


# -- waits -----------------------------------------------------------------------------------------


async def test_retry_after_ms_alone_sets_the_wait(
    emulator: Emulator, client: BemClient, clock: FakeClock
) -> None:
    emulator.update(rate_limit_rps=0.4, rate_limit_burst=1, retry_after_format="milliseconds")
    await client.list_calls()
    waits: list[float] = []

    await advancing(clock, client.list_calls(), waits.append)

    assert statuses(emulator, "GET /v3/calls") == {"200": 2, "429": 1}
    assert waits[0] == pytest.approx(2.5)  # retry-after-ms: 2500, not the short backoff


@pytest.mark.parametrize(("status", "fault"), [(503, "error_5xx_rate"), (409, "error_rate")])
async def test_retry_after_is_honoured_on_5xx_and_409_too(
    emulator: Emulator, client: BemClient, clock: FakeClock, status: int, fault: str
) -> None:
    emulator.update(**{fault: 1.0}, error_status=409, fault_retry_after=7.0)
    waits: list[float] = []

    def recover(wait: float) -> None:
        waits.append(wait)
        emulator.update(**{fault: 0.0})

    await advancing(clock, client.list_calls(), recover)

    assert waits == [pytest.approx(7.0)]
    assert statuses(emulator, "GET /v3/calls").get("200") == 1


def test_the_wait_headers_read_as_the_sdk_reads_them() -> None:
    sdk = bem.Bem(api_key=KEY, base_url=BASE_URL)
    for headers in (
        {"retry-after-ms": "1500"},
        {"retry-after-ms": "1500", "retry-after": "9"},
        {"retry-after": "3"},
        {"retry-after": "2.5"},
        {"retry-after-ms": "junk", "retry-after": "4"},
    ):
        ours = api_failures.retry_after_seconds(httpx.Headers(headers), now=0.0)
        assert ours == sdk._parse_retry_after_header(httpx.Headers(headers))


# -- 409 -------------------------------------------------------------------------------------------


async def test_a_409_on_a_post_is_outcome_unknown_and_sent_once(
    emulator: Emulator, client: BemClient, upload: UploadFile
) -> None:
    emulator.update(error_rate=1.0, error_status=409)

    with pytest.raises(OutcomeUnknownError, match="may have been created"):
        await client.invoke_workflow("wf", [upload], call_reference_id="r409", batch=False)

    assert statuses(emulator, INVOKE) == {"409": 1}


# -- redirects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_reads_follow_every_redirect(
    emulator: Emulator, client: BemClient, upload: UploadFile, status: int
) -> None:
    created = await client.invoke_workflow("wf", [upload], call_reference_id="r", batch=False)
    emulator.update(redirect_status=status)

    found = await client.get_call(created.call_id)
    listed = await client.list_calls(CallFilter(reference_ids=["r"]))

    assert found.call_id == created.call_id
    assert [call.call_id for call in listed] == [created.call_id]


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("multipart", [False, True])
async def test_a_post_redirected_by_307_or_308_sends_the_same_body_again(
    emulator: Emulator, client: BemClient, tmp_path: Path, status: int, multipart: bool
) -> None:
    files = []
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(f"content of {name}".encode())
        files.append(UploadFile(tmp_path / name, "text", item_reference_id=name))
    emulator.update(redirect_status=status)

    call = await client.invoke_workflow(
        "wf", files, call_reference_id="moved", batch=True, multipart=multipart
    )
    emulator.advance(2.0)
    emulator.update(redirect_status=None)
    done = await client.get_call(call.call_id)

    assert emulator.stats()["calls_total"] == 1
    assert statuses(emulator, INVOKE) == {str(status): 1, "202": 1}
    contents = {event.reference_id: event.transformed_content["byteSize"] for event in done.outputs}
    assert contents == {"a.txt": len(b"content of a.txt"), "b.txt": len(b"content of b.txt")}


@pytest.mark.parametrize("status", [301, 302, 303])
async def test_a_post_redirected_by_301_302_303_becomes_a_get_as_httpx_does(
    emulator: Emulator, client: BemClient, upload: UploadFile, status: int
) -> None:
    emulator.update(redirect_status=status)

    with pytest.raises(PermanentError):
        await client.invoke_workflow("wf", [upload], call_reference_id="r", batch=False)

    assert emulator.stats()["calls_total"] == 0


async def test_a_redirect_to_another_origin_is_not_followed(
    clock: FakeClock, upload: UploadFile
) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(307, headers={"location": "http://elsewhere.test/v3/calls/c1"})

    transport = httpx.MockTransport(answer)
    async with BemClient(base_url=BASE_URL, api_key=KEY, transport=transport, clock=clock) as c:
        with pytest.raises(PermanentError, match="another origin") as on_get:
            await c.get_call("c1")
        with pytest.raises(PermanentError, match="another origin"):
            await c.invoke_workflow("wf", [upload], call_reference_id="r", batch=False)

    assert [request.url.host for request in seen] == ["bem.test", "bem.test"]
    assert "elsewhere.test" in str(on_get.value)


# -- null answers ----------------------------------------------------------------------------------


async def test_call_null_on_a_get_is_not_found_at_once(
    emulator: Emulator, client: BemClient, upload: UploadFile
) -> None:
    created = await client.invoke_workflow("wf", [upload], call_reference_id="r", batch=False)
    emulator.update(null_call=True)

    with pytest.raises(NotFoundError, match="call: null"):
        await client.get_call(created.call_id)

    assert statuses(emulator, GET_CALL) == {"200": 1}


async def test_call_null_on_a_post_is_outcome_unknown_and_the_call_can_be_found(
    emulator: Emulator, client: BemClient, upload: UploadFile
) -> None:
    emulator.update(null_call=True)

    with pytest.raises(OutcomeUnknownError, match="without a call"):
        await client.invoke_workflow("wf", [upload], call_reference_id="ghost", batch=False)

    found = await client.list_calls(CallFilter(reference_ids=["ghost"]))
    assert [call.call_reference_id for call in found] == ["ghost"]


async def test_null_outputs_and_errors_read_as_empty_lists(
    emulator: Emulator, client: BemClient, upload: UploadFile
) -> None:
    created = await client.invoke_workflow("wf", [upload], call_reference_id="r", batch=False)
    emulator.advance(2.0)
    emulator.update(null_events=True)

    call = await client.get_call(created.call_id)
    [listed] = await client.list_calls(CallFilter(call_ids=[created.call_id]))

    assert (call.outputs, call.errors, listed.outputs, listed.errors) == ([], [], [], [])
    assert call.is_terminal


# -- fields and event types bem adds ---------------------------------------------------------------

LATER_CALL: dict[str, Any] = {
    "callID": "c1",
    "callReferenceID": "r",
    "status": "completed",
    "addedLater": {"nested": [1, None, "x"]},
    "input": {"singleFile": {"inputType": "pdf", "pageCount": 3}},
    "outputs": [
        {
            "eventType": "summarize",
            "referenceID": "a.pdf",
            "itemOffset": "0",
            "summary": "one line",
            "transformedContent": {"total": 1e3},
        }
    ],
    "errors": None,
}


async def test_fields_and_event_types_bem_adds_are_read_and_kept_as_sent(clock: FakeClock) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        body = {"calls": [LATER_CALL]} if request.url.path == "/v3/calls" else {"call": LATER_CALL}
        return httpx.Response(200, json=body)

    transport = httpx.MockTransport(answer)
    async with BemClient(base_url=BASE_URL, api_key=KEY, transport=transport, clock=clock) as c:
        got = await c.get_call("c1")
        [listed] = await c.list_calls()

    for call in (got, listed):
        [output] = call.outputs
        assert (output.event_type, output.reference_id) == ("summarize", "a.pdf")
        assert output.item_offset == 0
        assert output.transformed_content == {"total": 1000.0}
        assert call.errors == []
        assert call.is_terminal
        assert json.loads(call.sent_json()) == LATER_CALL


def test_a_call_not_read_from_bem_is_its_fields_that_are_set() -> None:
    call = make_call(status="running", outputs=[{"eventID": "e1"}])

    assert json.loads(call.sent_json()) == {
        "callID": "c1",
        "status": "running",
        "outputs": [{"eventID": "e1"}],
    }


# -- item names in multipart forms -----------------------------------------------------------------

raw_names = st.binary(min_size=1, max_size=24).filter(
    lambda raw: b"/" not in raw and b"\0" not in raw
)
text_names = st.sampled_from(
    ['a"b.txt', "a\rb.txt", "a\nb.txt", "a\\b.txt", "é.txt", "a%22b.txt", "a;b.txt", "x/y.txt",
     "日本.txt", "plain.txt", "a b.txt", "tab\t.txt", "'q'.txt"]
)  # fmt: skip


@given(references=st.lists(text_names | raw_names.map(names.from_raw), min_size=1, max_size=4))
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_every_item_name_comes_back_exactly_as_its_outputs_reference(
    emulator: Emulator,
    client: BemClient,
    recording: Recording,
    tmp_path: Path,
    references: list[str],
) -> None:
    shown = [names.shown(reference) for reference in references]
    if len(set(shown)) != len(shown):
        return
    files = []
    for index, reference in enumerate(references):
        path = tmp_path / f"item{index}.txt"
        path.write_bytes(f"item {index}".encode())
        files.append(UploadFile(path, "text", item_reference_id=reference))
    recording.sent.clear()

    call = await client.invoke_workflow(
        "wf", files, call_reference_id="names", batch=True, multipart=True
    )
    emulator.advance(2.0)
    done = await client.get_call(call.call_id)

    assert sorted(event.reference_id or "" for event in done.outputs) == sorted(shown)
    assert call_mismatch(done, call_reference_id="names", item_reference_ids=shown) is None
    form = recording.sent[0][1].startswith("multipart/form-data")
    assert form == all(portable_filename(name) for name in shown)


# -- API keys --------------------------------------------------------------------------------------

BAD_KEY_CHARACTERS = [chr(code) for code in [*range(0x20), 0x7F]] + ["é", "\udcff", "\u2028"]


@given(
    head=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8),
    bad=st.sampled_from(BAD_KEY_CHARACTERS),
    tail=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8),
)
@settings(max_examples=120)
def test_a_key_no_header_can_carry_is_a_config_error_that_never_shows_it(
    head: str, bad: str, tail: str
) -> None:
    key = f"{head}{bad}{tail}"
    if bad == "\t" and head and tail:
        return  # a tab between visible characters is a valid header value
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    transport = httpx.MockTransport(answer)

    with pytest.raises(ConfigError) as caught:
        BemClient(base_url=BASE_URL, api_key=key, transport=transport)

    assert header_value_problem(key) is not None
    for text in (str(caught.value), repr(caught.value)):
        assert key not in text
        assert repr(key)[1:-1] not in text
    assert seen == []


async def test_a_transport_error_that_quotes_a_header_is_reported_without_its_text(
    clock: FakeClock,
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        value = request.headers["x-api-key"].encode()
        raise httpx.LocalProtocolError(f"Illegal header value {value!r}")

    transport = httpx.MockTransport(refuse)
    with structlog.testing.capture_logs() as logs:
        async with BemClient(base_url=BASE_URL, api_key=KEY, transport=transport, clock=clock) as c:
            with pytest.raises(TransientError) as caught:
                await advancing(clock, c.get_call("c1"))

    error = caught.value
    assert "LocalProtocolError" in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert KEY not in str(error) + repr(error) + json.dumps(logs, default=str)


def test_the_redactor_removes_a_key_in_every_form_a_message_shows() -> None:
    key = "K\r\nX: 1"
    redactor = api_failures.Redactor(key)
    for text in (key, repr(key), repr(key.encode()), f"value {key.encode()!r} rejected"):
        assert "K\\r\\nX" not in redactor.redact(text)
        assert key not in redactor.redact(text)


# -- where a request went -------------------------------------------------------------------------


async def test_an_unreachable_server_is_reported_by_its_url_without_the_query(
    clock: FakeClock, upload: UploadFile, refused_port: int
) -> None:
    base_url = f"http://127.0.0.1:{refused_port}"
    async with BemClient(base_url=base_url, api_key=KEY, clock=clock, read_attempts=1) as c:
        with pytest.raises(TransientError) as on_post:
            await c.invoke_workflow("my-flow", [upload], call_reference_id="r", batch=False)
        with pytest.raises(TransientError) as on_list:
            await c.list_calls(CallFilter(reference_ids=["secret-reference"]))

    assert str(on_post.value).startswith(f"POST {base_url}/v3/workflows/my-flow/call: ConnectError")
    assert str(on_list.value).startswith(f"GET {base_url}/v3/calls: ConnectError")
    assert "secret-reference" not in str(on_list.value)
    assert "{workflowName}" not in str(on_post.value)


# -- is this the call that was sent? ---------------------------------------------------------------


def make_call(**fields: Any) -> Call:
    return msgspec.convert({"callID": "c1", **fields}, Call)


def test_a_call_with_another_reference_is_a_mismatch() -> None:
    assert call_mismatch(make_call(callReferenceID="mine"), call_reference_id="mine") is None
    assert "not 'mine'" in (
        call_mismatch(make_call(callReferenceID="x"), call_reference_id="mine") or ""
    )
    assert call_mismatch(make_call(), call_reference_id="mine") is not None


def test_a_batch_naming_items_that_were_not_sent_is_a_mismatch() -> None:
    call = make_call(
        callReferenceID="r",
        outputs=[{"referenceID": "a.txt"}, {"referenceID": "stranger.txt"}],
        errors=[{"referenceID": "anything"}],
        input={"batchFiles": {"inputs": [{"itemReferenceID": "a.txt"}]}},
    )
    problem = call_mismatch(call, call_reference_id="r", item_reference_ids=["a.txt"])
    assert problem is not None
    assert "stranger.txt" in problem
    sent = ["a.txt", "stranger.txt"]
    assert call_mismatch(call, call_reference_id="r", item_reference_ids=sent) is None


@pytest.mark.parametrize(
    ("status", "creates", "header", "expected"),
    [
        (409, False, None, TransientError),
        (409, True, None, OutcomeUnknownError),
        (409, True, "false", OutcomeUnknownError),
        (500, False, "false", PermanentError),
        (500, True, "true", OutcomeUnknownError),
        (400, False, "true", TransientError),
        (400, True, "true", TransientError),
        (404, False, "false", NotFoundError),
        (429, False, None, RateLimitedError),
        (429, True, "false", PermanentError),
        (408, True, None, TransientError),
        (422, True, None, PermanentError),
    ],
)
def test_what_each_answer_means(
    status: int, creates: bool, header: str | None, expected: type[Exception]
) -> None:
    should_retry = {None: None, "true": True, "false": False}[header]
    error = api_failures.status_error(
        status, creates=creates, message="m", should_retry=should_retry
    )
    assert type(error) is expected
