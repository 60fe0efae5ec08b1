"""What a command loads before it runs: ``bem-runner --help`` and ``drain`` import ``runner.cli``,
which must not pull in the modules only some commands use (the webhook receiver's server,
metrics, the emulator, the HTTP transport, the PostgreSQL driver); ``--help`` loads no more
than click and the few modules the group itself needs. Checked in a fresh interpreter by what
is in ``sys.modules``, never by timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    "msgspec",
    "structlog",
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


def test_the_api_client_loads_no_pydantic() -> None:
    """bem's answers are read with msgspec: the client and its models need no pydantic."""
    loaded = loaded_after("import runner.api.client")

    assert "msgspec" in loaded
    assert "pydantic" not in loaded


def test_the_api_models_build_their_decoders_when_they_first_read() -> None:
    """A response type builds its decoder when it first reads: a v3 drain never builds the v2
    ones."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from runner.api import models\n"
            "def built(model):\n"
            "    return model.__dict__.get('_decoder') is not None\n"
            "before = built(models.V2CallResponse)\n"
            "models.V2CallResponse.from_json(b'{}')\n"
            "print(before, built(models.V2CallResponse), built(models.V2CreateResponse))",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["False", "True", "False"]


# -- garbage collection at start-up -------------------------------------------------------------

WATCH_THE_EVENT_LOOP_START = """
import gc, json, sys
import anyio
from runner import cli

seen = []
real_run = anyio.run


def run(*args, **kwargs):
    seen.append({"collecting": gc.isenabled(), "frozen": gc.get_freeze_count()})
    return real_run(*args, **kwargs)


anyio.run = run
sys.argv = ["bem-runner", *sys.argv[1:]]
try:
    cli.main()
finally:
    print(json.dumps(seen))
"""


def test_a_command_collects_garbage_from_when_its_event_loop_starts(tmp_path: Path) -> None:
    """Start-up runs with collection off (`runner.cli.main`); the command's modules, imported
    by then, are frozen, and collection is on again before the command does its work."""
    state = tmp_path / "state.db"
    out = subprocess.run(
        [sys.executable, "-c", WATCH_THE_EVENT_LOOP_START, "status", "--state", str(state)],
        capture_output=True,
        text=True,
    )
    seen = json.loads(out.stdout.splitlines()[-1])

    assert len(seen) == 1  # the status command ran its event loop once
    assert seen[0]["collecting"] is True
    assert seen[0]["frozen"] > 10_000  # the modules status imported, among others


WATCH_A_LAZY_COMMAND_LOAD = """
import gc, sys
from runner import cli

real_get_command = cli.LazyGroup.get_command


def get_command(self, ctx, name):
    if name in self.lazy:
        print("collecting while", name, "loads:", gc.isenabled())
    return real_get_command(self, ctx, name)


cli.LazyGroup.get_command = get_command
sys.argv = ["bem-runner", "emulator", "--help"]
try:
    cli.main()
finally:
    print("frozen:", gc.get_freeze_count() > 0, "collecting:", gc.isenabled())
"""


def test_a_lazy_command_loads_with_collection_off_and_runs_with_it_on() -> None:
    out = subprocess.run(
        [sys.executable, "-c", WATCH_A_LAZY_COMMAND_LOAD], capture_output=True, text=True
    )

    assert "collecting while emulator loads: False" in out.stdout
    assert "frozen: True collecting: True" in out.stdout
