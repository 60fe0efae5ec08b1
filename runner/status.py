"""``bem-runner status``: what the store says, as a table or JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from runner.store.base import Store


async def collect_status(store: Store) -> dict[str, Any]:
    counts = await store.counts()
    errors = await store.recent_errors(limit=10)
    return {
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
    if report["recent_errors"]:
        errors = Table(title="recent errors")
        errors.add_column("file")
        errors.add_column("reason")
        errors.add_column("at")
        for error in report["recent_errors"]:
            errors.add_row(error["file"], error["reason"] or "", error["at"] or "")
        console.print(errors)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
