"""The pure parts of webhooks (signatures, the relaxed schedule), the store's event methods, and
the ``[webhook]`` configuration."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.config import load_config
from runner.credentials import Secret
from runner.errors import ConfigError
from runner.route import Destination
from runner.store import Store, open_store
from runner.store.base import NewFile, NextPoll, WebhookEvent
from runner.webhook import parse_event, parse_signature, sign, verify
from runner.webhook_policy import EventFlow, expected_event_seconds, relaxed_poll_at

SECRETS = (Secret("whsec_one"), Secret("whsec_two"))
NOW = 1_700_000_000

pytest_plugins = ["tests.postgres"]


# -- signatures -------------------------------------------------------------------------------


@given(body=st.binary(max_size=300), secret=st.sampled_from(SECRETS))
def test_a_signature_by_either_secret_verifies(body: bytes, secret: Secret) -> None:
    header = sign(secret.get_secret_value(), NOW, body)
    assert verify(header, body, SECRETS, now=NOW, tolerance=300) == "ok"


@given(body=st.binary(min_size=1, max_size=300), data=st.data())
def test_any_change_to_the_body_is_refused(body: bytes, data: st.DataObject) -> None:
    header = sign("whsec_one", NOW, body)
    position = data.draw(st.integers(0, len(body) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = body[:position] + bytes([body[position] ^ flip]) + body[position + 1 :]
    assert verify(header, tampered, SECRETS, now=NOW, tolerance=300) == "mismatch"


@given(offset=st.integers(-10_000, 10_000))
def test_timestamps_outside_the_tolerance_are_refused(offset: int) -> None:
    header = sign("whsec_one", NOW + offset, b"{}")
    verdict = verify(header, b"{}", SECRETS, now=NOW, tolerance=300)
    expected = "ok" if abs(offset) <= 300 else ("stale" if offset < 0 else "future")
    assert verdict == expected


@given(header=st.text(max_size=200))
def test_arbitrary_headers_never_verify(header: str) -> None:
    assert verify(header, b"{}", SECRETS, now=NOW, tolerance=300) != "ok"


def test_signature_parsing() -> None:
    mac = "a" * 64
    assert parse_signature(f"t=5, v1={mac}, v0=zz") is not None
    assert parse_signature(f"t=5,v1={mac.upper()}").macs == (mac,)  # type: ignore[union-attr]
    for bad in ("", "t=5", f"v1={mac}", f"t=-5,v1={mac}", f"t=5,v1={mac},junk", "t=1" + "0" * 20):
        assert parse_signature(bad) is None, bad


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"eventID": "e", "eventType": "transform", "callID": "c"}, True),
        ({"eventID": "e", "eventType": "error"}, True),
        ({"eventType": "transform"}, False),
        ({"eventID": "", "eventType": "transform"}, False),
        ({"eventID": 5, "eventType": "transform"}, False),
        ({"eventID": "e", "eventType": "t", "callID": 7}, False),
        (["not", "an", "object"], False),
    ],
)
def test_event_parsing(body: Any, ok: bool) -> None:
    assert (parse_event(json.dumps(body).encode()) is not None) is ok
    assert parse_event(b"\xff not json") is None


# -- the relaxed schedule ---------------------------------------------------------------------

times = st.floats(0, 10_000, allow_nan=False)


@given(normal=times, now=times, submitted=times, event=st.none() | times, flowing=st.booleans(),
       expected=st.floats(0.1, 1000), safety=st.floats(1, 1000))  # fmt: skip
def test_relaxed_polls_are_never_earlier_and_bounded(
    normal: float,
    now: float,
    submitted: float,
    event: float | None,
    flowing: bool,
    expected: float,
    safety: float,
) -> None:
    at = relaxed_poll_at(
        normal_at=normal, now=now, submitted_at=submitted, event_at=event, flowing=flowing,
        expected=expected, safety_net=safety,
    )  # fmt: skip
    assert at >= normal
    if event is not None or not flowing or now >= submitted + expected:
        assert at == normal  # confirming, no events flowing, or overdue: polled as today
    else:
        assert at <= max(normal, now + safety, submitted + expected)
        assert at <= max(normal, submitted + expected)


def test_the_expectation_is_learned_from_recent_calls() -> None:
    assert expected_event_seconds([1.0] * 4, default=60) == 60
    assert expected_event_seconds([1.0] * 10, default=60) == 2.0
    assert expected_event_seconds([0.01] * 10, default=60) == 1.0  # at least a second
    flow = EventFlow(overdue_after=60, safety_net=300, listening_since=0)
    assert flow.flowing(299)
    assert not flow.flowing(301)
    flow.heard(400, submitted_at=398)
    assert flow.flowing(401)


# -- the store --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Both stores keep webhook events the same way."""
    target = (
        tmp_path / "state.db"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    async with open_store(target) as opened:
        yield opened


async def submitted_call(store: Store, name: str, *, call_id: str | None) -> int:
    destination = Destination(workflow="wf", mode="file", batch_key=name, item_reference_id=name)
    await store.add_files(
        [NewFile(name, 1, 1, None, "text", destination)], now=0.0, batch_limits={}
    )
    call = (await store.ready_calls(now=1.0, limit=100))[-1]
    await store.mark_sending([call.id], now=1.0)
    if call_id is not None:
        await store.mark_submitted(call.id, call_id=call_id, status=None, now=2.0, next_poll=500)
    return call.id


def hook_event(event_id: str, call_id: str | None, reference: str | None = None) -> WebhookEvent:
    return WebhookEvent(event_id, "transform", call_id, reference)


@pytest.mark.anyio
async def test_an_event_marks_its_call_once(store: Store) -> None:
    gid = await submitted_call(store, "a", call_id="call_a")
    first = await store.record_webhook_event(hook_event("e1", "call_a"), now=10, confirm_at=10.2)
    assert (first.duplicate, first.call_row_id, first.submitted_at) == (False, gid, 2.0)
    call = await store.call(gid)
    assert (call.not_before, call.event_at) == (10.2, 10)
    again = await store.record_webhook_event(hook_event("e1", "call_a"), now=20, confirm_at=20.2)
    assert again.duplicate
    assert (await store.call(gid)).event_at == 10
    assert await store.webhook_event_counts() == {"matched": 1}


@pytest.mark.anyio
async def test_early_events_are_claimed_when_the_call_is_recorded(store: Store) -> None:
    gid = await submitted_call(store, "b", call_id=None)
    call = await store.call(gid)
    early = await store.record_webhook_event(hook_event("e1", "call_b"), now=5, confirm_at=5.2)
    by_reference = hook_event("e2", None, call.call_reference_id)
    await store.record_webhook_event(by_reference, now=5, confirm_at=5.2)
    assert early.call_row_id is None
    assert await store.webhook_event_counts() == {"pending": 2}
    await store.mark_submitted(gid, call_id="call_b", status=None, now=6, next_poll=900)
    claimed = await store.claim_webhook_events(
        gid, call_id="call_b", call_reference_id=call.call_reference_id, now=6, confirm_at=6.2
    )
    assert claimed == 2
    assert (await store.call(gid)).not_before == 6.2
    assert await store.webhook_event_counts() == {"matched": 2}


@pytest.mark.anyio
async def test_unmatched_events_are_dropped_then_forgotten(store: Store) -> None:
    await store.record_webhook_event(hook_event("old", "call_x"), now=10, confirm_at=10)
    await store.record_webhook_event(hook_event("new", "call_y"), now=100, confirm_at=100)
    dropped = await store.expire_webhook_events(received_before=50, purge_before=0)
    assert dropped == 1
    assert await store.webhook_event_counts() == {"dropped": 1, "pending": 1}
    await store.expire_webhook_events(received_before=0, purge_before=50)
    assert await store.webhook_event_counts() == {"pending": 1}


@pytest.mark.anyio
async def test_an_event_during_a_poll_is_not_postponed_by_it(store: Store) -> None:
    gid = await submitted_call(store, "c", call_id="call_c")
    read = await store.call(gid)  # the poller reads the call, then sends its GET...
    await store.record_webhook_event(hook_event("e", "call_c"), now=30, confirm_at=30.2)
    seen = read.event_at or 0.0
    await store.reschedule_polls([NextPoll(gid, 800.0, "running", seen_event_at=seen)])
    assert (await store.call(gid)).not_before == 30.2  # ...and its answer keeps the event's
    read = await store.call(gid)
    await store.reschedule_polls([NextPoll(gid, 40.0, "running", seen_event_at=read.event_at)])
    assert (await store.call(gid)).not_before == 40.0  # nothing new: the poller's time


# -- configuration ----------------------------------------------------------------------------


def webhook_config(environ: dict[str, str] | None = None, **webhook: object) -> Any:
    overrides = {f"webhook.{key}": value for key, value in webhook.items()}
    return load_config(None, environ={"BEM_API_KEY": "k", **(environ or {})}, overrides=overrides)


def test_webhook_config_defaults_and_secrets(tmp_path: Path) -> None:
    config = webhook_config()
    assert config.webhook.listen is None
    assert config.webhook.path == "/bem/webhook"
    assert config.webhook.tolerance_seconds == 300
    assert config.webhook_secrets == ()
    current, previous = tmp_path / "current", tmp_path / "previous"
    current.write_text("whsec_file\n")
    previous.write_text("whsec_old\n")
    config = webhook_config(
        listen="127.0.0.1:8765", secret_file=str(current), previous_secret_file=str(previous)
    )
    assert [s.get_secret_value() for s in config.webhook_secrets] == ["whsec_file", "whsec_old"]
    config = webhook_config({"BEM_WEBHOOK_SECRET": "whsec_env"}, secret_file=str(current))
    assert config.webhook_secrets[0].get_secret_value() == "whsec_env"
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "webhook-secret").write_text("whsec_cred")
    config = webhook_config({"CREDENTIALS_DIRECTORY": str(credentials)}, listen=":8765")
    assert config.webhook_secrets[0].get_secret_value() == "whsec_cred"
    assert "whsec" not in repr(config)


@pytest.mark.parametrize(
    "webhook",
    [
        {"listen": "127.0.0.1:8765"},  # no secret anywhere
        {"listen": "nonsense"},
        {"listen": "127.0.0.1:70000"},
        {"listen": 8765},
        {"path": "no-slash"},
        {"path": "/with?query"},
        {"tolerance_seconds": 0},
        {"tolerance_seconds": True},
        {"tolerance_seconds": "300"},
        {"tolerance_seconds": 1e9},
        {"overdue_after": "-1s"},
        {"safety_net": 0},
        {"max_concurrency": 0},
        {"surprise": 1},
    ],
)
def test_bad_webhook_settings_are_config_errors(webhook: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as caught:
        webhook_config(None, **webhook)
    assert "webhook" in str(caught.value)
