"""``bench/compare.py --webhook`` runs end to end: both bem-runner rows deliver every file once
and carry time-to-result figures. Only counts are checked, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_compare_with_webhooks_runs_both_runner_rows(tmp_path: Path) -> None:
    rows_path = tmp_path / "rows.json"
    argv = [sys.executable, str(REPO / "bench" / "compare.py"), "--webhook"]
    argv += ["--files", "20", "--rate", "200", "--burst", "20", "--latency", "0.05-0.1"]
    argv += ["--clients", "bem-runner", "--json", str(rows_path)]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    rows = {row["client"]: row for row in json.loads(rows_path.read_text())}
    assert set(rows) == {"bem-runner", "bem-runner+webhook"}
    for row in rows.values():
        assert row["delivered"] == row["files"] == 20
        assert row["duplicates"] == 0
        assert row["result_p95_seconds"] is not None
    assert "| bem-runner+webhook |" in completed.stdout
    assert "result p95 s" in completed.stdout
