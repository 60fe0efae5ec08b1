"""What ``compare.py --webhook`` adds: bem-runner with its webhook receiver, and time to result.

The emulator (a subprocess) gets a signing secret and subscriptions to the runner's receiver for
the transform and error events of the workflow's function; the runner gets the secret in
``BEM_WEBHOOK_SECRET`` and ``[webhook] listen`` on a free loopback port. Time to result is, per
result document, the time it was renamed into place (its ctime) minus the call's
``finishedAt`` — the moment the emulator fires the call's events (the emulator and the runner
share this machine's clock).
"""

from __future__ import annotations

import json
import socket
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

import harness

CLIENT = "bem-runner+webhook"
HOOK_PATH = "/bem/webhook"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def subscribe(emu: harness.Emulator, function: str, port: int) -> str:
    """A fresh signing secret and subscriptions to ``port``; returns the secret."""
    headers = {"x-api-key": harness.API_KEY}
    response = emu.http.post(f"{emu.base_url}/v3/webhook-secret", headers=headers)
    response.raise_for_status()
    secret: str = response.json()["secret"]
    for kind in ("transform", "error"):
        body = {
            "name": f"bench {kind}",
            "type": kind,
            "functionName": function,
            "webhookURL": f"http://127.0.0.1:{port}{HOOK_PATH}",
        }
        created = emu.http.post(f"{emu.base_url}/v3/subscriptions", json=body, headers=headers)
        created.raise_for_status()
    return secret


def unsubscribe(emu: harness.Emulator) -> None:
    headers = {"x-api-key": harness.API_KEY}
    listed = emu.http.get(f"{emu.base_url}/v3/subscriptions", headers=headers).json()
    for subscription in listed:
        sid = subscription["subscriptionID"]
        emu.http.delete(f"{emu.base_url}/v3/subscriptions/{sid}", headers=headers)


def webhook_section(port: int) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{port}", "path": HOOK_PATH}


def times_to_result(outbox: Path) -> list[float]:
    """Seconds from each call's finishedAt to its result document, one per document."""
    seconds = []
    for path in outbox.rglob("*.json"):
        document = json.loads(path.read_text())
        finished = document.get("finishedAt")
        if finished:
            moment = datetime.fromisoformat(finished.replace("Z", "+00:00")).timestamp()
            stat = path.stat()  # a rename sets ctime: the moment the document appeared
            seconds.append(max(stat.st_mtime, stat.st_ctime) - moment)
    return seconds


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]
