"""What a command loads before it runs: ``bem-runner --help`` and ``drain`` import ``runner.cli``,
which must not pull in the modules only some commands use (the webhook receiver's server,
metrics, the emulator, the HTTP transport, the PostgreSQL driver). Checked in a fresh
interpreter by what is in ``sys.modules``, never by timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Each loads only where it is used: the webhook receiver (uvicorn, starlette), a metrics
# endpoint (prometheus_client), `bem-runner emulator`, a client opening its pool (aiohttp),
# a postgresql:// store (psycopg).
ONLY_WHEN_USED = (
    "uvicorn",
    "starlette",
    "prometheus_client",
    "runner.emulator",
    "runner.webhook",
    "aiohttp",
    "psycopg",
)


def loaded_after(statement: str) -> set[str]:
    probe = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", ["runner.cli", "runner.api.client", "runner.daemon"])
def test_importing_a_command_module_loads_no_server_and_no_transport(module: str) -> None:
    loaded = loaded_after(f"import {module}")

    assert module in loaded
    assert {name for name in ONLY_WHEN_USED if name in loaded} == set()


def test_the_transport_module_is_what_loads_aiohttp() -> None:
    """The probe above can see aiohttp: importing the transport does load it."""
    assert "aiohttp" in loaded_after("import runner.api.transport")
