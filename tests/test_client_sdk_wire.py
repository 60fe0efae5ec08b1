"""Our requests against the official SDK's, captured through ``httpx.MockTransport``.

For every request the runner makes that the SDK can make too (invoke as JSON, get one call,
list calls), the SDK's request and ours must agree on method, raw path, query pairs, JSON body
and the headers bem reads. Names and IDs are drawn by hypothesis, so the comparison covers
every character a path or a query can carry.
"""

from __future__ import annotations

import base64
import json
import random
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bem
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.api import BemClient, CallFilter, UploadFile
from runner.clock import FakeClock
from runner.errors import NotFoundError, PermanentError

pytestmark = pytest.mark.anyio

KEY = "sk-wire-0123456789"
BASE_URL = "http://wire.test"
CALL = {
    "callID": "c1",
    "callType": "workflow",
    "callReferenceID": "ref",
    "createdAt": "2026-01-01T00:00:00Z",
    "errors": [],
    "outputs": [],
    "url": "u",
    "traceUrl": "t",
}
# The body is compared as JSON; its length differs with the encoder's escaping and spacing.
HEADERS_BEM_READS = ("x-api-key", "accept", "content-type")

names = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30).filter(
    lambda name: name not in (".", "..")
)
ids = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters=","), min_size=1, max_size=20
)
id_lists = st.lists(ids, min_size=1, max_size=4)


class Capture:
    """A stand-in bem that answers every request with one call and keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def transport(self) -> httpx.MockTransport:
        def answer(request: httpx.Request) -> httpx.Response:
            request.read()
            self.requests.append(request)
            return httpx.Response(200, json={"call": CALL, "calls": [CALL]})

        return httpx.MockTransport(answer)


async def sdk_request(action: Callable[[bem.AsyncBem], Awaitable[object]]) -> httpx.Request:
    capture = Capture()
    async with httpx.AsyncClient(transport=capture.transport(), base_url=BASE_URL) as http:
        sdk = bem.AsyncBem(api_key=KEY, base_url=BASE_URL, http_client=http, max_retries=0)
        await action(sdk)
    [request] = capture.requests
    return request


async def our_request(action: Callable[[BemClient], Awaitable[object]]) -> httpx.Request:
    capture = Capture()
    client = BemClient(
        base_url=BASE_URL,
        api_key=KEY,
        transport=capture.transport(),
        clock=FakeClock(),
        rng=random.Random(1),
    )
    async with client:
        await action(client)
    [request] = capture.requests
    return request


def query_pairs(request: httpx.Request) -> list[tuple[str, str]]:
    query = request.url.query.decode("ascii")
    return sorted(urllib.parse.parse_qsl(query, keep_blank_values=True))


def assert_same_request(ours: httpx.Request, sdks: httpx.Request) -> None:
    assert ours.method == sdks.method
    assert ours.url.raw_path.split(b"?")[0] == sdks.url.raw_path.split(b"?")[0]
    assert query_pairs(ours) == query_pairs(sdks)
    if sdks.content:
        assert json.loads(ours.content) == json.loads(sdks.content)
    else:
        assert not ours.content
    for header in HEADERS_BEM_READS:
        assert ours.headers.get(header) == sdks.headers.get(header), header


# -- listing ---------------------------------------------------------------------------------------


@given(
    call_ids=id_lists,
    reference_ids=id_lists,
    statuses=st.lists(st.sampled_from(["pending", "running", "completed", "failed"]), min_size=1),
    workflow_names=id_lists,
    limit=st.integers(min_value=1, max_value=100),
    after=ids,
)
# no deadline: an example builds real clients, whose time depends on the machine, not the code
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_list_filters_go_as_the_sdk_sends_them(
    call_ids: list[str],
    reference_ids: list[str],
    statuses: list[Any],
    workflow_names: list[str],
    limit: int,
    after: str,
) -> None:
    filters: dict[str, Any] = {
        "call_ids": call_ids,
        "reference_ids": reference_ids,
        "statuses": statuses,
        "workflow_names": workflow_names,
        "limit": limit,
        "starting_after": after,
        "sort_order": "asc",
    }

    async def sdk_lists(sdk: bem.AsyncBem) -> object:
        return await sdk.calls.list(**filters)

    async def we_list(client: BemClient) -> object:
        return await client.list_calls(
            CallFilter(
                call_ids=call_ids,
                reference_ids=reference_ids,
                statuses=statuses,
                workflow_names=workflow_names,
                sort_order="asc",
            ),
            limit=limit,
            starting_after=after,
        )

    ours, sdks = await our_request(we_list), await sdk_request(sdk_lists)

    assert_same_request(ours, sdks)
    keys = [key for key, _ in query_pairs(ours)]
    assert len(keys) == len(set(keys)), "every key once"


async def test_the_poll_listing_sends_one_callids_key() -> None:
    ours = await our_request(
        lambda client: client.list_calls(CallFilter(call_ids=["a", "b"]), limit=2)
    )
    assert urllib.parse.parse_qsl(ours.url.query.decode()) == [("callIDs", "a,b"), ("limit", "2")]


@pytest.mark.parametrize("bad", ["a,b", ""])
async def test_an_id_that_a_comma_joined_list_cannot_carry_is_refused_unsent(bad: str) -> None:
    capture = Capture()
    async with BemClient(base_url=BASE_URL, api_key=KEY, transport=capture.transport()) as client:
        with pytest.raises(PermanentError, match="comma-joined"):
            await client.list_calls(CallFilter(reference_ids=["ok", bad]))
    assert capture.requests == []


# -- one call --------------------------------------------------------------------------------------


@given(call_id=names)
@settings(max_examples=60)
async def test_get_call_path_is_the_sdks(call_id: str) -> None:
    async def sdk_gets(sdk: bem.AsyncBem) -> object:
        return await sdk.calls.retrieve(call_id)

    async def we_get(client: BemClient) -> object:
        return await client.get_call(call_id)

    assert_same_request(await our_request(we_get), await sdk_request(sdk_gets))


# -- invoke ----------------------------------------------------------------------------------------


@given(
    workflow=names,
    references=st.lists(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=20), min_size=1, max_size=3
    ),
    wait=st.booleans(),
    metadata=st.none() | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
# no deadline: an example builds real clients, whose time depends on the machine, not the code
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_a_json_batch_invoke_is_the_sdks(
    tmp_path: Path,
    workflow: str,
    references: list[str],
    wait: bool,
    metadata: dict[str, int] | None,
) -> None:
    contents = [f"file {index}".encode() for index in range(len(references))]
    uploads = []
    for index, content in enumerate(contents):
        path = tmp_path / f"f{index}.txt"
        path.write_bytes(content)
        uploads.append(UploadFile(path, "text", item_reference_id=references[index]))
    sdk_inputs = [
        {"input_content": base64.b64encode(c).decode(), "input_type": "text",
         "item_reference_id": reference}
        for c, reference in zip(contents, references, strict=True)
    ]  # fmt: skip
    options: dict[str, Any] = {"wait": True} if wait else {}
    if metadata is not None:
        options["metadata"] = metadata

    async def sdk_calls(sdk: bem.AsyncBem) -> object:
        return await sdk.workflows.call(
            workflow,
            input={"batch_files": {"inputs": sdk_inputs}},  # type: ignore[typeddict-item]
            call_reference_id="ref",
            **options,
        )

    async def we_call(client: BemClient) -> object:
        return await client.invoke_workflow(
            workflow, uploads, call_reference_id="ref", batch=True, **options
        )

    assert_same_request(await our_request(we_call), await sdk_request(sdk_calls))


@pytest.mark.parametrize("workflow", [".", "..", ""])
async def test_a_workflow_no_path_can_name_is_refused_like_the_sdk_does(
    tmp_path: Path, workflow: str
) -> None:
    upload_path = tmp_path / "a.txt"
    upload_path.write_bytes(b"a")
    capture = Capture()
    async with BemClient(base_url=BASE_URL, api_key=KEY, transport=capture.transport()) as client:
        with pytest.raises(PermanentError, match="cannot be sent"):
            await client.invoke_workflow(
                workflow, [UploadFile(upload_path, "text")], call_reference_id="r", batch=False
            )
        with pytest.raises(NotFoundError):
            await client.get_call(workflow)
    assert capture.requests == []

    async with httpx.AsyncClient(transport=capture.transport(), base_url=BASE_URL) as http:
        sdk = bem.AsyncBem(api_key=KEY, base_url=BASE_URL, http_client=http, max_retries=0)
        with pytest.raises(ValueError, match=r"workflow_name|dot-segment"):
            await sdk.workflows.call(workflow, input={})
    assert capture.requests == []
