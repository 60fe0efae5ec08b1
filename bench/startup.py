"""What bem-runner's commands pay in imports before they do anything.

Each figure is a fresh interpreter timing one import statement (wall and CPU seconds), the best of
``--runs``: ``runner.cli`` is what ``bem-runner --help`` imports (each command then imports what
it uses); a drain imports the configuration, the pipeline and the HTTP transport (with garbage
collection off, as ``bem-runner`` runs a command's imports), then the SQLite store, and starts
anyio's event loop. The drain's row is all of it from a fresh interpreter, ``runner.cli``
included (the modules a real ``bem-runner drain --no-progress`` has in ``sys.modules`` at its
end); the transport's row is its share of that. The heavy modules a drain does not use (uvicorn
and starlette for the webhook receiver, prometheus_client for metrics, the emulator, psycopg,
pydantic, which bem's SDK brings into a development environment) are listed when a probe has
loaded them, and for ``--help`` also those a drain needs (httpx, aiohttp, msgspec, structlog).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence

PYTHON = sys.executable
DEFAULT_RUNS = 7
# Modules only some commands use: present after a probe means a drain (or --help) pays for them.
HEAVY = ("uvicorn", "starlette", "prometheus_client", "runner.emulator", "psycopg", "pydantic")
# What a drain needs and --help does not.
NOT_FOR_HELP = ("httpx", "aiohttp", "msgspec", "structlog")
# What a drain imports besides runner.cli, in its order: the configuration, the pipeline and the
# HTTP transport with the command (while the command line collects no garbage, as
# runner.cli.main does), then the SQLite store and anyio's worker threads once the runner starts.
COMMAND = "runner.config, runner.daemon, runner.api.transport"
STARTED = "runner.store.sqlite, anyio.to_thread"
PROBE = """
import json, sys, time
{before}
wall, cpu = time.perf_counter(), time.process_time()
{statement}
print(json.dumps({{"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                  "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""
# The event loop's start loads anyio's asyncio backend: a drain pays for it too.
START_LOOP = "import anyio; anyio.run(anyio.sleep, 0)"
DRAIN_IMPORTS = f"""import runner.cli
import gc; gc.disable()
import {COMMAND}
gc.freeze(); gc.enable()
import {STARTED}"""


def probe(statement: str, *, before: str = "", heavy: Sequence[str] = HEAVY) -> str:
    return PROBE.format(before=before, statement=statement, heavy=tuple(heavy))


def measure(code: str, runs: int) -> tuple[float, float, list[str]]:
    """Best wall and CPU seconds over ``runs`` fresh interpreters, and the heavy modules seen."""
    walls, cpus, loaded = [], [], set()
    # As installed: from cached bytecode (the first run writes it, and the best run is kept).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    for _ in range(runs):
        out = subprocess.run(
            [PYTHON, "-c", code], check=True, capture_output=True, text=True, env=env
        )
        figures = json.loads(out.stdout)
        walls.append(figures["wall"])
        cpus.append(figures["cpu"])
        loaded.update(figures["loaded"])
    return min(walls), min(cpus), sorted(loaded)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    args = parser.parse_args(argv)
    rows = [
        ("import runner.cli (--help)", probe("import runner.cli", heavy=HEAVY + NOT_FOR_HELP)),
        (
            "a drain's imports in total (runner.cli included)",
            probe(f"{DRAIN_IMPORTS}\n{START_LOOP}"),
        ),
        (
            "of which the HTTP transport",
            probe(
                "import runner.api.transport",
                before="import runner.cli, gc; gc.disable(); import runner.config, runner.daemon",
            ),
        ),
    ]
    print("| what | wall s | CPU s | heavy modules loaded |")
    print("| --- | --- | --- | --- |")
    for name, code in rows:
        wall, cpu, loaded = measure(code, args.runs)
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {', '.join(loaded) or 'none'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
