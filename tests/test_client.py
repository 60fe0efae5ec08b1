"""BemClient against the emulator: request shapes, reads, listings, v2, multipart, the limiter."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import tracemalloc
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import anyio
import httpx
import pytest
import structlog

from runner.api import BemClient, CallFilter, UploadFile, V2CallRequest, parse_retry_after
from runner.clock import FakeClock
from runner.emulator import Emulator, EmulatorSettings
from runner.errors import NotFoundError, PermanentError, RateLimitedError, TransientError
from runner.ratelimit import RateLimiter

pytestmark = pytest.mark.anyio

API_KEY = "sk-live-client-test-0123456789"
BASE_URL = "http://bem.test"
T = TypeVar("T")


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def emulator(clock: FakeClock) -> Emulator:
    settings = EmulatorSettings(api_key=API_KEY, latency_min=3.0, latency_max=3.0)
    return Emulator(settings, clock=clock.now)


def make_client(
    emulator: Emulator, clock: FakeClock, *, limiter: RateLimiter | None = None
) -> BemClient:
    return BemClient(
        base_url=BASE_URL,
        api_key=API_KEY,
        transport=httpx.ASGITransport(app=emulator.app),
        clock=clock,
        limiter=limiter,
        rng=random.Random(7),
    )


@pytest.fixture
async def client(emulator: Emulator, clock: FakeClock) -> AsyncIterator[BemClient]:
    async with make_client(emulator, clock) as bem:
        yield bem


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def requests_to(emulator: Emulator, route: str) -> dict[str, int]:
    requests: dict[str, dict[str, int]] = emulator.stats()["requests"]
    return requests.get(route, {})


async def run_advancing(clock: FakeClock, operation: Awaitable[T]) -> T:
    """Await ``operation`` while moving ``clock`` to each sleeper's deadline in turn."""

    async def keep_advancing() -> None:
        while True:
            await clock.wait_for_sleepers(1)
            clock.advance_to_next_deadline()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(keep_advancing)
            try:
                return await operation
            finally:
                tasks.cancel_scope.cancel()
    except ExceptionGroup as group:
        # Raise the operation's own error, as a caller without this driver would see it.
        [error] = group.exceptions
        raise error from error.__cause__
    raise AssertionError("unreachable: the task group either returned or raised")


INVOKE = "POST /v3/workflows/{workflowName}/call"


# -- v3 invoke, JSON -----------------------------------------------------------------------------


async def test_single_file_call_carries_content_reference_and_metadata(
    client: BemClient, emulator: Emulator, clock: FakeClock, tmp_path: Path
) -> None:
    # Larger than one read chunk, so the chunk-wise base64 must join up exactly.
    content = bytes(range(256)) * 5000
    source = write(tmp_path / "invoice.pdf", content)

    call = await client.invoke_workflow(
        "invoice-extract",
        [UploadFile(source, "pdf")],
        call_reference_id="ref-single",
        batch=False,
        metadata={"source": "inbox", "n": 1},
    )

    assert call.status == "pending"
    assert call.call_reference_id == "ref-single"
    assert call.workflow_name == "invoice-extract"
    assert call.input is not None
    assert call.input.single_file is not None
    assert call.input.single_file.input_type == "pdf"
    digest = hashlib.sha256(content).hexdigest()
    assert emulator.stats()["files_by_content_sha256"] == {digest: 1}

    clock.advance(3.0)
    done = await client.get_call(call.call_id)
    assert done.status == "completed"
    [output] = done.outputs
    assert output.transformed_content["sha256"] == digest
    assert output.transformed_content["_metadata"] == {"source": "inbox", "n": 1}


async def test_batch_call_sends_every_file_with_its_item_reference(
    client: BemClient, clock: FakeClock, tmp_path: Path
) -> None:
    files = [
        UploadFile(write(tmp_path / "a.txt", b"first"), "text", "folder/a.txt"),
        UploadFile(write(tmp_path / "b.csv", b"x,y\n1,2\n"), "csv", "folder/b.csv"),
    ]

    call = await client.invoke_workflow("wf", files, call_reference_id="ref-batch", batch=True)

    assert call.input is not None
    assert call.input.batch_files is not None
    sent = [(item.item_reference_id, item.input_type) for item in call.input.batch_files.inputs]
    assert sent == [("folder/a.txt", "text"), ("folder/b.csv", "csv")]
    clock.advance(3.0)
    done = await client.get_call(call.call_id)
    assert sorted(output.reference_id or "" for output in done.outputs) == sorted(
        ["folder/a.txt", "folder/b.csv"]
    )


async def test_wait_returns_the_finished_call_and_a_failed_one_too(
    emulator: Emulator, client: BemClient, tmp_path: Path
) -> None:
    emulator.update(latency_min=0.0, latency_max=0.0)
    good = write(tmp_path / "good.txt", b"fine content")
    bad = write(tmp_path / "bad.txt", b"BEM-EMULATOR-FAIL please")

    completed = await client.invoke_workflow(
        "wf", [UploadFile(good, "text")], call_reference_id="w1", batch=False, wait=True
    )
    # bem answers a failed wait=true call with HTTP 500 carrying the call itself.
    failed = await client.invoke_workflow(
        "wf", [UploadFile(bad, "text")], call_reference_id="w2", batch=False, wait=True
    )

    assert completed.status == "completed"
    assert completed.outputs
    assert failed.status == "failed"
    assert failed.errors
    assert requests_to(emulator, INVOKE) == {"200": 1, "500": 1}


async def test_bad_arguments_and_unreadable_files_send_nothing(
    client: BemClient, emulator: Emulator, tmp_path: Path
) -> None:
    one = UploadFile(write(tmp_path / "one.txt", b"1"), "text")
    missing = UploadFile(tmp_path / "gone.txt", "text")

    with pytest.raises(ValueError, match="exactly one file"):
        await client.invoke_workflow("wf", [one, one], call_reference_id="r", batch=False)
    with pytest.raises(ValueError, match="at least one file"):
        await client.invoke_workflow("wf", [], call_reference_id="r", batch=True)
    for multipart in (False, True):
        with pytest.raises(PermanentError, match=r"gone\.txt") as caught:
            await client.invoke_workflow(
                "wf", [missing], call_reference_id="r", batch=False, multipart=multipart
            )
        assert isinstance(caught.value.__cause__, FileNotFoundError)
    with pytest.raises(PermanentError, match=r"gone\.txt"):
        await client.create_calls_v2(
            [V2CallRequest("wf", "r", (one,)), V2CallRequest("wf", "s", (missing,))]
        )

    assert emulator.stats()["requests"] == {}


async def test_invalid_content_is_a_permanent_error_with_bems_message(
    client: BemClient, tmp_path: Path
) -> None:
    source = write(tmp_path / "x.txt", b"BEM-EMULATOR-INVALID")

    with pytest.raises(PermanentError, match="BEM-EMULATOR-INVALID") as caught:
        await client.invoke_workflow(
            "wf", [UploadFile(source, "text")], call_reference_id="r", batch=False
        )

    assert caught.value.status_code == 400


# -- multipart -----------------------------------------------------------------------------------


async def test_multipart_single_file_with_form_fields(
    client: BemClient, emulator: Emulator, clock: FakeClock, tmp_path: Path
) -> None:
    content = b"%PDF-1.4 multipart body"
    source = write(tmp_path / "scan.pdf", content)

    call = await client.invoke_workflow(
        "wf",
        [UploadFile(source, "pdf")],
        call_reference_id="mp-1",
        batch=False,
        metadata={"via": "form"},
        multipart=True,
    )

    assert call.call_reference_id == "mp-1"
    assert call.input is not None
    assert call.input.single_file is not None
    assert call.input.single_file.input_type == "pdf"
    assert emulator.stats()["files_by_content_sha256"] == {hashlib.sha256(content).hexdigest(): 1}
    clock.advance(3.0)
    [output] = (await client.get_call(call.call_id)).outputs
    assert output.transformed_content["_metadata"] == {"via": "form"}


async def test_multipart_batch_names_each_file_by_its_item_reference(
    client: BemClient, tmp_path: Path
) -> None:
    files = [
        UploadFile(write(tmp_path / "1.pdf", b"%PDF one"), "pdf", "box/first.pdf"),
        UploadFile(write(tmp_path / "2.png", b"\x89PNG two"), "png", "box/second.png"),
        UploadFile(write(tmp_path / "3.pdf", b"%PDF three"), "pdf", "box/third.pdf"),
    ]

    call = await client.invoke_workflow(
        "wf", files, call_reference_id="mp-batch", batch=True, multipart=True
    )

    assert call.input is not None
    assert call.input.batch_files is not None
    sent = [(item.item_reference_id, item.input_type) for item in call.input.batch_files.inputs]
    assert sent == [("box/first.pdf", "pdf"), ("box/second.png", "png"), ("box/third.pdf", "pdf")]


async def test_multipart_upload_streams_from_disk_in_bounded_memory(
    client: BemClient, emulator: Emulator, tmp_path: Path
) -> None:
    size = 50 * 1024 * 1024
    source = tmp_path / "big.pdf"
    with source.open("wb") as handle:
        handle.write(b"%PDF-1.4\n")
        handle.truncate(size)  # sparse: costs no disk blocks here

    tracemalloc.start()
    try:
        call = await client.invoke_workflow(
            "wf", [UploadFile(source, "pdf")], call_reference_id="big", batch=False, multipart=True
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert call.call_reference_id == "big"
    [files] = emulator.stats()["files_by_content_sha256"].values()
    assert files == 1
    assert peak < size // 10, f"peak Python allocation {peak} bytes for a {size}-byte upload"


# -- reads and listings --------------------------------------------------------------------------


async def test_get_call_of_unknown_id_is_not_found_and_not_retried(
    client: BemClient, emulator: Emulator
) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_call("call_does_not_exist")

    assert caught.value.status_code == 404
    assert requests_to(emulator, "GET /v3/calls/{callID}") == {"404": 1}


async def make_calls(
    client: BemClient, tmp_path: Path, workflow: str, prefix: str, count: int
) -> list[str]:
    """Create ``count`` calls to ``workflow``; returns their call IDs in creation order."""
    ids = []
    for index in range(count):
        source = write(tmp_path / f"{prefix}-{index}.txt", f"{prefix} {index}".encode())
        call = await client.invoke_workflow(
            workflow,
            [UploadFile(source, "text")],
            call_reference_id=f"{prefix}-{index}",
            batch=False,
        )
        ids.append(call.call_id)
    return ids


async def test_iter_calls_walks_every_page_with_the_last_call_as_cursor(
    client: BemClient, emulator: Emulator, tmp_path: Path
) -> None:
    wanted = await make_calls(client, tmp_path, "paged", "page", 7)
    await make_calls(client, tmp_path, "other", "noise", 3)

    ascending = [
        call.call_id
        async for call in client.iter_calls(CallFilter(workflow_names=["paged"]), limit=3)
    ]
    listings_for_ascending = sum(requests_to(emulator, "GET /v3/calls").values())
    descending = [
        call.call_id
        async for call in client.iter_calls(
            CallFilter(workflow_names=["paged"], sort_order="desc"), limit=4
        )
    ]

    assert ascending == wanted
    assert listings_for_ascending == 4  # pages of 3, 3, 1, then the empty page that ends it
    assert descending == wanted[::-1]


async def test_list_calls_filters_and_cursors(
    client: BemClient, emulator: Emulator, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await make_calls(client, tmp_path, "listed", "lst", 6)
    clock.advance(3.0)
    late = await make_calls(client, tmp_path, "listed", "late", 1)

    after = await client.list_calls(
        CallFilter(workflow_names=["listed"]), starting_after=ids[1], limit=3
    )
    before = await client.list_calls(
        CallFilter(workflow_names=["listed"]), ending_before=ids[4], limit=2
    )
    by_reference = await client.list_calls(CallFilter(reference_ids=["lst-0", "lst-5"]))
    by_substring = await client.list_calls(CallFilter(reference_id_substring="LATE"))
    pending = await client.list_calls(CallFilter(workflow_names=["listed"], statuses=["pending"]))
    by_id = await client.list_calls(CallFilter(call_ids=[ids[2]]))

    assert [call.call_id for call in after] == ids[2:5]
    assert [call.call_id for call in before] == ids[2:4]
    assert [call.call_reference_id for call in by_reference] == ["lst-0", "lst-5"]
    assert [call.call_id for call in by_substring] == late
    assert [call.call_id for call in pending] == late
    assert [call.call_id for call in by_id] == [ids[2]]
    assert await client.list_calls(CallFilter(workflow_names=["nothing-here"])) == []


# -- v2 ------------------------------------------------------------------------------------------


async def test_v2_creates_several_calls_in_one_request_and_gets_them(
    client: BemClient, emulator: Emulator, clock: FakeClock, tmp_path: Path
) -> None:
    text = write(tmp_path / "note.txt", b"a note")
    pdf = write(tmp_path / "doc.pdf", b"%PDF doc")
    requests = [
        V2CallRequest("wf-a", "v2-one", (UploadFile(text, "text"),)),
        V2CallRequest(
            "wf-b",
            "v2-two",
            (UploadFile(text, "text", "items/note.txt"), UploadFile(pdf, "pdf", "items/doc.pdf")),
            batch=True,
        ),
        V2CallRequest("wf-a", "v2-three", (UploadFile(pdf, "pdf"),)),
    ]

    created = await client.create_calls_v2(requests)

    assert [call.call_reference_id for call in created] == ["v2-one", "v2-two", "v2-three"]
    assert requests_to(emulator, "POST /v2/calls") == {"200": 1}
    assert emulator.stats()["calls_total"] == 3
    clock.advance(3.0)
    fetched = [await client.get_call_v2(call.call_id) for call in created]
    assert [call.status for call in fetched] == ["completed"] * 3
    batch_call = fetched[1]
    assert batch_call.workflow_name == "wf-b"
    assert batch_call.input is not None
    assert batch_call.input.batch_files is not None
    assert [item.item_reference_id for item in batch_call.input.batch_files.inputs] == [
        "items/note.txt",
        "items/doc.pdf",
    ]
    assert batch_call.function_calls
    assert batch_call.function_calls[0].status == "completed"


# -- the rate limiter ----------------------------------------------------------------------------


async def test_every_attempt_waits_for_the_limiter(emulator: Emulator, clock: FakeClock) -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_concurrency=4, clock=clock)
    emulator.update(error_5xx_rate=1.0)
    async with make_client(emulator, clock, limiter=limiter) as client:
        with pytest.raises(TransientError):
            await run_advancing(clock, client.get_call("call_x"))

    # Five attempts need five tokens of a one-per-second bucket: at least four seconds.
    assert sum(requests_to(emulator, "GET /v3/calls/{callID}").values()) == 5
    assert clock.now() >= 4.0


async def test_a_429_pauses_the_limiter_for_every_request_until_retry_after(
    emulator: Emulator, clock: FakeClock, tmp_path: Path
) -> None:
    emulator.update(rate_limit_rps=1.0, rate_limit_burst=1)
    limiter = RateLimiter(rate=10.0, burst=10, max_concurrency=4, clock=clock)
    source = write(tmp_path / "held.txt", b"held back")
    async with make_client(emulator, clock, limiter=limiter) as client:
        await client.list_calls()  # takes the emulator's only token
        with pytest.raises(RateLimitedError) as caught:
            await client.invoke_workflow(
                "wf", [UploadFile(source, "text")], call_reference_id="held", batch=False
            )
        assert caught.value.retry_after == 1.0
        assert limiter.paused_until == clock.now() + 1.0
        assert limiter.current_rate == 5.0

        created: list[str] = []

        async def submit() -> None:
            call = await client.invoke_workflow(
                "wf", [UploadFile(source, "text")], call_reference_id="held", batch=False
            )
            created.append(call.call_id)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(submit)
            await clock.wait_for_sleepers(1)
            assert requests_to(emulator, INVOKE) == {"429": 1}  # the new POST is held back
            clock.advance(1.0)
            # no token accrued during the pause: the POST waits one interval more
            await clock.wait_for_sleepers(1)
            assert requests_to(emulator, INVOKE) == {"429": 1}
            clock.advance_to_next_deadline()

        assert len(created) == 1
        assert requests_to(emulator, INVOKE) == {"429": 1, "202": 1}
        clock.advance(3.0)
        await client.get_call(created[0])
        # nothing waits for a token: a success is no reason to probe above the rate (see
        # tests/test_ratelimit_learning.py for how the rate is learnt and probed)
        assert limiter.current_rate == 5.0


# -- logging and Retry-After parsing -------------------------------------------------------------


async def test_requests_are_logged_without_the_key(client: BemClient, tmp_path: Path) -> None:
    source = write(tmp_path / "log.txt", b"logged")
    with structlog.testing.capture_logs() as logs:
        await client.invoke_workflow(
            "wf", [UploadFile(source, "text")], call_reference_id="log", batch=False
        )
        with pytest.raises(NotFoundError):
            await client.get_call("nope")

    assert [(entry["method"], entry["status"]) for entry in logs] == [("POST", 202), ("GET", 404)]
    assert logs[0]["route"] == "/v3/workflows/{workflowName}/call"
    assert API_KEY not in json.dumps(logs, default=str)
    assert API_KEY not in repr(client)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("Tue, 14 Nov 2023 22:13:40 GMT", 20.0),  # 1_700_000_020 on the wall clock
        ("Tue, 14 Nov 2023 22:13:00 GMT", 0.0),  # already past
        ("soon", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=1_700_000_000.0) == expected


async def test_json_body_is_valid_json_with_base64_content(tmp_path: Path) -> None:
    """The hand-assembled JSON body decodes to the document bem expects."""
    content = b"\x00\xffbinary\n" * 1000
    source = write(tmp_path / "bin.pdf", content)
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        call = {"callID": "c1", "callReferenceID": "r", "status": "pending"}
        return httpx.Response(202, json={"call": call})

    async with BemClient(
        base_url=BASE_URL, api_key=API_KEY, transport=httpx.MockTransport(answer)
    ) as bem:
        await bem.invoke_workflow(
            "my wf/x",
            [UploadFile(source, "pdf", "dir/bin.pdf")],
            call_reference_id="r",
            batch=True,
            metadata={"quote": 'say "hi"', "unicode": "é"},
        )

    [request] = seen
    assert request.url.raw_path == b"/v3/workflows/my%20wf%2Fx/call"
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["content-length"] == str(len(request.content))
    assert "transfer-encoding" not in request.headers
    document = json.loads(request.content)
    [item] = document["input"]["batchFiles"]["inputs"]
    assert base64.b64decode(item.pop("inputContent")) == content
    assert item == {"inputType": "pdf", "itemReferenceID": "dir/bin.pdf"}
    assert document["callReferenceID"] == "r"
    assert document["metadata"] == {"quote": 'say "hi"', "unicode": "é"}


@pytest.mark.parametrize(
    "base_url", ["http://bem.test", "http://bem.test/api/", "http://bem.test/api"]
)
async def test_posts_go_to_the_workflows_url_under_the_base_each_time(
    tmp_path: Path, base_url: str
) -> None:
    source = write(tmp_path / "a.txt", b"a")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        call = {"callID": f"c{len(seen)}", "callReferenceID": "r", "status": "pending"}
        return httpx.Response(202, json={"call": call})

    transport = httpx.MockTransport(answer)
    async with BemClient(base_url=base_url, api_key=API_KEY, transport=transport) as bem:
        for workflow, wait in [("a", False), ("b", True), ("a", False), ("b", True), ("a", True)]:
            await bem.invoke_workflow(
                workflow, [UploadFile(source, "text", "a.txt")], call_reference_id="r",
                batch=False, wait=wait,
            )  # fmt: skip
    prefix = base_url.removesuffix("/").removeprefix("http://bem.test")
    assert [str(r.url) for r in seen] == [
        f"http://bem.test{prefix}/v3/workflows/a/call",
        f"http://bem.test{prefix}/v3/workflows/b/call?wait=true",
        f"http://bem.test{prefix}/v3/workflows/a/call",
        f"http://bem.test{prefix}/v3/workflows/b/call?wait=true",
        f"http://bem.test{prefix}/v3/workflows/a/call?wait=true",
    ]
