from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from runner.group import CallFacts, next_check, should_close
from runner.store.base import CallRow

BASE = CallRow(
    id=1,
    call_reference_id="bemr-x",
    workflow="wf",
    mode="folder",
    batch_key="wf/f",
    state="collecting",
    opened_at=100.0,
    last_added_at=100.0,
    file_count=1,
    byte_count=1,
    not_before=0.0,
    attempts=0,
    sent_at=None,
    submitted_at=None,
    call_id=None,
    status=None,
    result_json=None,
    error_reason=None,
    finished_at=None,
)


def facts(**changes: object) -> CallFacts:
    base = CallFacts(
        now=100.0,
        settle_seconds=2.0,
        window_seconds=None,
        ready_marker=False,
        unsettled_inside=False,
        inbox_taken=False,
    )
    return msgspec.structs.replace(base, **changes)


def test_folder_closes_on_marker_or_quiet_but_never_with_unsettled_files() -> None:
    assert not should_close(BASE, facts())
    assert should_close(BASE, facts(ready_marker=True))
    assert should_close(BASE, facts(now=102.0))
    assert not should_close(BASE, facts(now=102.0, unsettled_inside=True))
    assert not should_close(BASE, facts(ready_marker=True, unsettled_inside=True))


def test_window_closes_when_old_enough() -> None:
    window = msgspec.structs.replace(BASE, mode="window", batch_key="window:0")
    assert not should_close(window, facts(now=109.0, window_seconds=10.0))
    assert should_close(window, facts(now=110.0, window_seconds=10.0))
    assert next_check(window, facts(window_seconds=10.0)) == 110.0


def test_a_drain_closes_everything_once_intake_is_done() -> None:
    assert should_close(BASE, facts(inbox_taken=True, unsettled_inside=True))


@given(
    mode=st.sampled_from(["folder", "window"]),
    state=st.sampled_from(["collecting", "ready", "sending", "polling", "done"]),
    now=st.floats(min_value=0, max_value=1000),
    settle=st.floats(min_value=0, max_value=100),
    window=st.one_of(st.none(), st.floats(min_value=0, max_value=100)),
    marker=st.booleans(),
    unsettled=st.booleans(),
    finished=st.booleans(),
)
def test_should_close_properties(
    mode: str,
    state: str,
    now: float,
    settle: float,
    window: float | None,
    marker: bool,
    unsettled: bool,
    finished: bool,
) -> None:
    call = msgspec.structs.replace(BASE, mode=mode, state=state)
    f = facts(
        now=now,
        settle_seconds=settle,
        window_seconds=window,
        ready_marker=marker,
        unsettled_inside=unsettled,
        inbox_taken=finished,
    )
    closes = should_close(call, f)
    if state != "collecting":
        assert not closes
    elif finished:
        assert closes
    elif mode == "folder" and unsettled:
        assert not closes
    # a call not closed now is looked at again no later than when it could close
    if state == "collecting" and not closes and not unsettled:
        later = msgspec.structs.replace(f, now=max(now, next_check(call, f)))
        assert should_close(call, later) or (mode == "window" and window is None)
