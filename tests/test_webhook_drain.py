"""Drains with webhooks, end to end over real HTTP: the emulator delivers signed events to the
runner's receiver; the poller confirms; every file gets exactly one document whatever happens to
the events (duplicated, reordered, early, lost, refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from runner.daemon import ExitCode
from runner.emulator import serve_emulator
from runner.store.base import Counts
from tests.conftest import free_port
from tests.pipeline import outbox_documents, write_files
from tests.webhook_helpers import (
    PREVIOUS_SECRET,
    SECRET,
    WORKFLOW,
    calls_gets,
    drain_with_hooks,
    event_states,
    hook_config,
    hook_emulator,
    runner_for,
    subscribe,
)

pytestmark = pytest.mark.anyio

DRAIN_TIMEOUT = 30.0


def inputs(count: int, *, failing: int = 0) -> list[tuple[str, bytes]]:
    files = [(f"{WORKFLOW}/doc-{n}.txt", f"document {n}".encode()) for n in range(count)]
    files += [
        (f"{WORKFLOW}/bad-{n}.txt", f"BEM-EMULATOR-FAIL {n}".encode()) for n in range(failing)
    ]
    return files


async def drain_case(
    tmp_path: Path,
    files: list[tuple[str, bytes]],
    *,
    emulator_settings: dict[str, Any] | None = None,
    webhook: dict[str, Any] | None = None,
    secret: str | None = SECRET,
    hook_port: int | None = None,
) -> tuple[ExitCode, dict[str, tuple[str, dict[str, Any]]], int, dict[str, int]]:
    """Drain ``files``; (exit code, documents, GETs of calls, webhook events by state)."""
    emulator = hook_emulator(**(emulator_settings or {}))
    emulator.webhooks.secret = secret
    port = free_port()
    async with serve_emulator(emulator) as base_url:
        await subscribe(base_url, f"http://127.0.0.1:{hook_port or port}/bem/webhook")
        config = hook_config(tmp_path, base_url, port, webhook=webhook or {})
        write_files(config.paths.inbox, files)
        with anyio.fail_after(DRAIN_TIMEOUT):
            outcome = await drain_with_hooks(config)
        gets = calls_gets(emulator)
        stats = emulator.stats()
    assert stats["calls_total"] == len(files), "one call per file"
    assert set(stats["calls_by_reference"].values()) == {1}
    return (
        outcome.exit_code,
        outbox_documents(config.paths.outbox),
        gets,
        event_states(config.paths.state),
    )


async def test_events_replace_polling(tmp_path: Path) -> None:
    files = inputs(12, failing=2)
    code, documents, gets, events = await drain_case(tmp_path, files)
    assert code == ExitCode.FILE_ERRORS
    assert sorted(documents) == sorted(rel for rel, _ in files)
    assert sorted(kind for kind, _ in documents.values()) == ["error"] * 2 + ["result"] * 12
    assert events == {"matched": len(files)}
    # overdue_after is 30 s and the drain took far less: every GET was an event's confirmation,
    # and events arriving together shared one
    assert gets <= len(files) / 2


async def test_duplicated_and_reordered_deliveries_give_one_document_per_file(
    tmp_path: Path,
) -> None:
    files = inputs(16)
    code, documents, _, events = await drain_case(
        tmp_path,
        files,
        emulator_settings={"webhook_duplicate_rate": 0.6, "webhook_reorder_seconds": 0.4},
    )
    assert code == ExitCode.OK
    assert sorted(documents) == sorted(rel for rel, _ in files)  # one each (or outbox_documents
    assert events == {"matched": len(files)}  # fails); duplicates recorded once


async def test_an_event_before_the_posts_answer_is_kept_and_matched(tmp_path: Path) -> None:
    # calls end at once, and every answer (the POST's too) comes 0.5 s late: each call's event
    # reaches the receiver before the runner knows the call
    files = inputs(4)
    code, documents, _, events = await drain_case(
        tmp_path,
        files,
        emulator_settings={"latency_min": 0.0, "latency_max": 0.0, "slow_rate": 1.0,
                           "slow_seconds": 0.5},
    )  # fmt: skip
    assert code == ExitCode.OK
    assert sorted(documents) == sorted(rel for rel, _ in files)
    assert events == {"matched": len(files)}  # claimed when the calls were recorded
    # (without the claim, each call would wait for overdue_after = 30 s: past DRAIN_TIMEOUT)


async def test_lost_events_cost_time_never_a_file(tmp_path: Path) -> None:
    files = inputs(10)
    code, documents, _, events = await drain_case(
        tmp_path,
        files,
        emulator_settings={"webhook_drop_rate": 0.5, "seed": 7},
        webhook={"overdue_after": 1},
    )
    assert code == ExitCode.OK
    assert sorted(documents) == sorted(rel for rel, _ in files)
    assert 0 < events.get("matched", 0) < len(files)  # some came, the rest were polled


async def test_receiver_unreachable_or_misconfigured_still_delivers_every_file(
    tmp_path: Path,
) -> None:
    files = inputs(6)
    unreachable = free_port()
    code, documents, _, events = await drain_case(
        tmp_path / "unreachable", files, webhook={"overdue_after": 1}, hook_port=unreachable
    )
    assert code == ExitCode.OK
    assert sorted(documents) == sorted(rel for rel, _ in files)
    assert events == {}
    code, documents, _, events = await drain_case(
        tmp_path / "wrong-secret", files, webhook={"overdue_after": 1}, secret="whsec_rotated"
    )
    assert code == ExitCode.OK
    assert sorted(documents) == sorted(rel for rel, _ in files)
    assert events == {}  # every delivery refused (401)


async def test_rotation_accepts_both_secrets_and_a_secret_changed_mid_drain_costs_only_time(
    tmp_path: Path,
) -> None:
    files = inputs(12)
    emulator = hook_emulator(latency_min=0.2, latency_max=1.5)
    emulator.webhooks.secret = PREVIOUS_SECRET  # bem still signs with the old secret
    port = free_port()
    rotated_at: int | None = None

    async def rotate_midway(counts: Counts) -> None:
        nonlocal rotated_at
        done = sum(n for state, n in counts.files.items() if state.startswith("done"))
        if rotated_at is None and done >= 4:
            rotated_at = done
            emulator.webhooks.secret = "whsec_a-third-secret-the-runner-does-not-know"

    async with serve_emulator(emulator) as base_url:
        await subscribe(base_url, f"http://127.0.0.1:{port}/bem/webhook")
        config = hook_config(
            tmp_path,
            base_url,
            port,
            environ={"BEM_WEBHOOK_PREVIOUS_SECRET": PREVIOUS_SECRET},
            webhook={"overdue_after": 1},
        )
        write_files(config.paths.inbox, files)
        with anyio.fail_after(DRAIN_TIMEOUT):
            outcome = await runner_for(config, drain=True, progress=rotate_midway).serve()
    assert outcome.exit_code == ExitCode.OK
    assert sorted(outbox_documents(config.paths.outbox)) == sorted(rel for rel, _ in files)
    events = event_states(config.paths.state)
    assert rotated_at is not None
    assert 0 < events.get("matched", 0) < len(files)  # accepted under the previous secret, then
    # refused under the unknown one: those files were delivered by polling
