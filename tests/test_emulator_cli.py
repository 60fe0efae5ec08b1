"""``bem-runner emulator``: options, and the served process from start to SIGTERM."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from click.testing import CliRunner

from runner.emulator.cli import emulator_command, parse_latency

LAUNCH = "from runner.emulator.cli import emulator_command; emulator_command()"


def test_serves_until_sigterm_with_the_key_from_the_environment() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--latency", "0", "--workflow", "invoices", "--seed", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"BEM_API_KEY": "key-from-env"},
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=base_url, headers={"x-api-key": "key-from-env"}) as client:
            content = base64.b64encode(b"hello").decode()
            body = {"input": {"singleFile": {"inputContent": content, "inputType": "text"}}}
            created = client.post("/v3/workflows/invoices/call", json=body)
            assert created.status_code == 202
            call_id = created.json()["call"]["callID"]
            assert client.get(f"/v3/calls/{call_id}").json()["call"]["status"] == "completed"
            assert client.post("/v3/workflows/receipts/call", json=body).status_code == 404
            default_key = client.get("/v3/calls", headers={"x-api-key": "emulator-key"})
            assert default_key.status_code == 401
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0
    assert "key-from-env" not in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--latency", "fast"], "--latency"),
        (["--latency", "3-1"], "latency_min"),
        (["--failure-rate", "2"], "failure_rate"),
        (["--rate-limit", "0"], "rate_limit_rps"),
        (["--rate-limit-burst", "0"], "rate_limit_burst"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(emulator_command, args)
    assert result.exit_code == 2
    assert message in result.output


def test_a_busy_port_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(emulator_command, ["--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot serve the emulator on 127.0.0.1:{port}" in result.output


def test_parse_latency() -> None:
    assert parse_latency("0.5-2") == (0.5, 2.0)
    assert parse_latency("1") == (1.0, 1.0)
