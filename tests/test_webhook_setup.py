"""``bem-runner webhook setup`` against the emulator over real HTTP: the secret and the
subscriptions are created once, the secret lands in a 0600 file and is printed nowhere."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import anyio
import pytest

from runner.emulator import serve_emulator
from tests.webhook_helpers import API_KEY, hook_emulator

pytestmark = pytest.mark.anyio

URL = "https://runner.example.com/bem/webhook"


async def setup(base_url: str, *args: str) -> tuple[int, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BEM_")}
    environ |= {"BEM_API_KEY": API_KEY, "BEM_BASE_URL": base_url}
    done = await anyio.run_process(
        [sys.executable, "-m", "runner", "webhook", "setup", "--url", URL, *args],
        env=environ,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).decode()


async def test_setup_creates_the_secret_and_subscriptions_once(tmp_path: Path) -> None:
    emulator = hook_emulator()
    secret_file = tmp_path / "creds" / "webhook-secret"
    args = ("--function", "wf-transform", "--function", "other", "--secret-file", str(secret_file))
    async with serve_emulator(emulator) as base_url:
        code, first = await setup(base_url, *args)
        secret = emulator.webhooks.secret
        code_again, second = await setup(base_url, *args)
    assert (code, code_again) == (0, 0), first + second
    assert secret is not None
    assert emulator.webhooks.secret == secret, "a second run keeps the secret"
    assert secret_file.read_text().strip() == secret
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret not in first + second
    assert "signing secret: created" in first
    assert first.count(": created (sub_") == 4
    assert "signing secret: exists" in second
    assert second.count(": exists (sub_") == 4
    subscriptions = list(emulator.webhooks.subscriptions.values())
    assert sorted((s.function_name, s.type, s.webhook_url) for s in subscriptions) == sorted(
        (function, kind, URL)
        for function in ("wf-transform", "other")
        for kind in ("transform", "error")
    )


async def test_setup_writes_bems_existing_secret_and_enables_a_disabled_subscription(
    tmp_path: Path,
) -> None:
    emulator = hook_emulator()
    existing = emulator.webhooks.new_secret()
    emulator.webhooks.add(
        {"name": "old", "type": "transform", "function_name": "wf-transform", "webhook_url": URL,
         "disabled": True}
    )  # fmt: skip
    secret_file = tmp_path / "webhook-secret"
    async with serve_emulator(emulator) as base_url:
        code, output = await setup(
            base_url, "--function", "wf-transform", "--secret-file", str(secret_file)
        )
    assert code == 0, output
    assert secret_file.read_text().strip() == existing
    assert "signing secret: exists, written to" in output
    assert "enabled" in output
    assert existing not in output
    assert not any(s.disabled for s in emulator.webhooks.subscriptions.values())


async def test_setup_needs_a_secret_file(tmp_path: Path) -> None:
    async with serve_emulator(hook_emulator()) as base_url:
        code, output = await setup(base_url, "--function", "f")
    assert code == 1
    assert "--secret-file" in output
