"""What bem-runner's commands pay in imports before they do anything.

Each figure is a fresh interpreter timing one import statement (wall and CPU seconds), the best of
``--runs``: ``runner.cli`` is what ``bem-runner --help`` (and every command) imports; a drain
then also loads the HTTP transport when its client opens its pool. The heavy modules a command
does not use (uvicorn and starlette for the webhook receiver, prometheus_client for metrics, the
emulator) are listed when ``runner.cli`` has loaded them.
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
# Modules only some commands use: present after `import runner.cli` means --help pays for them.
HEAVY = ("uvicorn", "starlette", "prometheus_client", "aiohttp", "runner.emulator", "psycopg")
PROBE = """
import json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
import {module}
print(json.dumps({{"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                  "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""
TRANSPORT_PROBE = """
import json, time
import runner.cli
wall, cpu = time.perf_counter(), time.process_time()
import runner.api.transport
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                  "loaded": []}))
"""


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
        (
            "import runner.cli (--help, every command)",
            PROBE.format(module="runner.cli", heavy=HEAVY),
        ),
        ("+ the HTTP transport (drain, run)", TRANSPORT_PROBE),
    ]
    print("| what | wall s | CPU s | heavy modules loaded |")
    print("| --- | --- | --- | --- |")
    for name, code in rows:
        wall, cpu, loaded = measure(code, args.runs)
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {', '.join(loaded) or 'none'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
