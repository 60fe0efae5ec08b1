"""What a command loads before it runs: ``bem-runner --help`` and ``drain`` import ``runner.cli``,
which must not pull in the modules only some commands use (the webhook receiver's server,
metrics, the emulator, the HTTP transport, the PostgreSQL driver); ``--help`` loads no more
than click and the few modules the group itself needs. Checked in a fresh interpreter by what
is in ``sys.modules``, never by timing."""

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


# What every command but --help loads: each command imports its own.
NOT_FOR_HELP = (
    "httpx",
    "pydantic",
    "structlog",
    "rich",
    "anyio",
    "runner.config",
    "runner.daemon",
    "runner.store",
    "runner.api",
    "runner.progress",
    "runner.status",
)


def test_help_loads_no_command() -> None:
    """``bem-runner --help`` lists the commands without importing what they use."""
    loaded = loaded_after(
        "import contextlib\n"
        "from runner.cli import main\n"
        "sys.argv = ['bem-runner', '--help']\n"
        "with contextlib.redirect_stdout(None), contextlib.suppress(SystemExit):\n"
        "    main()"
    )

    assert "click" in loaded
    assert {name for name in NOT_FOR_HELP if name in loaded} == set()


def test_the_pipeline_loads_no_progress_bar_and_no_status_table() -> None:
    """A drain imports its progress bar only to show it, and never the status command's table."""
    loaded = loaded_after("import runner.cli, runner.daemon, runner.config, runner.store.sqlite")

    assert "runner.daemon" in loaded
    assert {"runner.progress", "runner.status", "runner.retry"} & loaded == set()


def test_the_api_models_build_their_validators_when_they_first_parse() -> None:
    """Importing the models builds none (a v3 drain never builds the v2 ones, and the nested
    models are built into the responses that hold them); parsing builds the one it uses."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from runner.api import models\n"
            "before = models.CallResponse.__pydantic_complete__\n"
            "models.CallResponse.model_validate_json(b'{\"call\": {\"callID\": \"c\"}}')\n"
            "print(before, models.CallResponse.__pydantic_complete__,"
            " models.V2CallResponse.__pydantic_complete__)",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["False", "True", "False"]
