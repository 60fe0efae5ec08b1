"""``bem-runner status``: what the store says, as a table or JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from runner.store.base import RunnerRow, Store
from runner.tables import table


async def collect_status(store: Store, *, now: float | None = None) -> dict[str, Any]:
    """The store's counts, recent errors and the runners sharing it; ``now`` (epoch seconds)
    gives each runner's heartbeat age."""
    counts = await store.counts()
    errors = await store.recent_errors(limit=10)
    runners = await store.runners()
    return {
        "runners": [_runner(row, now) for row in runners],
        "files": counts.files,
        "calls": counts.calls,
        "open_calls": counts.open_calls,
        "reused": counts.reused,
        "recent_errors": [
            {"file": rel, "reason": reason, "at": _iso(at)} for rel, reason, at in errors
        ],
    }


def render_status(report: dict[str, Any]) -> str:
    """The report of :func:`collect_status` as tables: counts, runners, recent errors."""
    counts = [
        *(("files", state, str(count)) for state, count in sorted(report["files"].items())),
        *(("calls", state, str(count)) for state, count in sorted(report["calls"].items())),
        ("calls", "open (sending, unknown, polling)", str(report["open_calls"])),
        ("files", "reused (a result copied, no call)", str(report["reused"])),
    ]
    parts = [
        table("bem-runner status", ("what", "state", "count"), counts, right={"count"}),
        render_runners(report["runners"]),
    ]
    if report["recent_errors"]:
        errors = (
            (error["file"], error["reason"] or "", error["at"] or "")
            for error in report["recent_errors"]
        )
        parts.append(table("recent errors", ("file", "reason", "at"), errors))
    return "\n\n".join(parts)


def render_runners(runners: list[dict[str, Any]]) -> str:
    if not runners:
        return "runners: none has joined this store"
    rows = []
    for runner in runners:
        age = runner["heartbeat_age_seconds"]
        heartbeat = runner["heartbeat_at"] + (f" ({age:.0f} s ago)" if age is not None else "")
        rows.append(
            (runner["id"], runner["host"], str(runner["pid"]), heartbeat, str(runner["calls_held"]))
        )
    columns = ("runner", "host", "pid", "last heartbeat", "calls held")
    return table("runners", columns, rows, right={"pid", "calls held"})


def _runner(row: RunnerRow, now: float | None) -> dict[str, Any]:
    return {
        "id": row.id,
        "host": row.host,
        "pid": row.pid,
        "started_at": _iso(row.started_at),
        "heartbeat_at": _iso(row.heartbeat_at),
        "heartbeat_age_seconds": None
        if now is None
        else round(max(0.0, now - row.heartbeat_at), 1),
        "calls_held": row.calls_held,
    }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
