"""``bem-runner status``: what the store says, as a table or JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from runner.store.base import RunnerRow, Store


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


def render_status(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="bem-runner status")
    table.add_column("what")
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, count in sorted(report["files"].items()):
        table.add_row("files", state, str(count))
    for state, count in sorted(report["calls"].items()):
        table.add_row("calls", state, str(count))
    table.add_row("calls", "open (sending, unknown, polling)", str(report["open_calls"]))
    table.add_row("files", "reused (a result copied, no call)", str(report["reused"]))
    console.print(table)
    render_runners(report["runners"], console)
    if report["recent_errors"]:
        errors = Table(title="recent errors")
        errors.add_column("file")
        errors.add_column("reason")
        errors.add_column("at")
        for error in report["recent_errors"]:
            errors.add_row(error["file"], error["reason"] or "", error["at"] or "")
        console.print(errors)


def render_runners(runners: list[dict[str, Any]], console: Console) -> None:
    if not runners:
        console.print("runners: none has joined this store")
        return
    table = Table(title="runners")
    for column in ("runner", "host", "pid", "last heartbeat", "calls held"):
        table.add_column(column, justify="right" if column in ("pid", "calls held") else "left")
    for runner in runners:
        age = runner["heartbeat_age_seconds"]
        heartbeat = runner["heartbeat_at"] + (f" ({age:.0f} s ago)" if age is not None else "")
        table.add_row(
            runner["id"], runner["host"], str(runner["pid"]), heartbeat, str(runner["calls_held"])
        )
    console.print(table)


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
