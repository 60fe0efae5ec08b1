"""The benchmark driver runs end to end: every client delivers every file exactly once.

Only counts are checked; the timings the driver prints are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_compare_runs_every_client_to_completion(tmp_path: Path) -> None:
    rows_path = tmp_path / "rows.json"
    options = {
        "--files": "20",
        "--rate": "200",
        "--burst": "20",
        "--latency": "0.05-0.1",
        "--sequential-files": "1",
        "--workdir": str(tmp_path / "work"),
        "--json": str(rows_path),
    }
    argv = [sys.executable, str(REPO / "bench" / "compare.py")]
    argv += [part for option in options.items() for part in option]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    rows = {row["client"]: row for row in json.loads(rows_path.read_text())}
    assert set(rows) == {"bem-runner", "async", "sequential"}
    assert [rows[c]["files"] for c in ("bem-runner", "async", "sequential")] == [20, 20, 1]
    for row in rows.values():
        assert row["delivered"] == row["files"]
        assert row["errors"] == 0
        assert row["duplicates"] == 0
        assert row["never_sent"] == 0
        assert row["submits_per_file"] >= 1
    assert rows["sequential"]["extrapolated"] is True
    assert "| bem-runner |" in completed.stdout
