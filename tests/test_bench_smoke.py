"""The benchmark driver runs end to end: every client delivers every file exactly once.

Only counts are checked; the timings the driver prints are never asserted.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NO_SERVER = not glob.glob("/usr/lib/postgresql/*/bin/initdb")
"""No PostgreSQL server binaries (Debian's postgresql package) for the bench to start one."""


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
        # what creating a file next to the outbox cost is measured; the probe's files are kept
        assert row["file_create_us"] > 0
    probes = list((tmp_path / "work" / "bem-runner" / "file-creation-probe").iterdir())
    assert len(probes) == 200
    assert rows["sequential"]["extrapolated"] is True
    assert "| bem-runner |" in completed.stdout


@pytest.mark.skipif(NO_SERVER, reason="no PostgreSQL server binaries to start one")
def test_scale_drains_on_a_throwaway_postgresql_store_beside_sqlite(tmp_path: Path) -> None:
    argv = [sys.executable, str(REPO / "bench" / "scale.py"), "--files", "20", "--rate", "200"]
    argv += ["--latency", "0.05-0.1", "--store", "postgresql", "--runners", "1"]
    argv += ["--workdir", str(tmp_path / "work")]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in completed.stdout.splitlines()
        if line.startswith("| ")
    ]
    by_store = {cells[0]: cells for cells in rows if cells[0] in ("sqlite", "postgresql")}
    assert set(by_store) == {"sqlite", "postgresql"}
    for cells in by_store.values():
        assert cells[-2:] == ["20/20", "0"]  # delivered, duplicates
    transactions, statements = (float(n) for n in by_store["postgresql"][6:8])
    assert 0 < transactions <= statements  # the database was used, and counted


@pytest.mark.skipif(NO_SERVER, reason="no PostgreSQL server binaries to start one")
def test_compare_runs_several_runners_on_one_store_as_one_client(tmp_path: Path) -> None:
    rows_path = tmp_path / "rows.json"
    argv = [sys.executable, str(REPO / "bench" / "compare.py"), "--files", "20", "--rate", "200"]
    argv += ["--burst", "20", "--latency", "0.05-0.1", "--clients", "bem-runner"]
    argv += ["--runners", "2", "--workdir", str(tmp_path / "work"), "--json", str(rows_path)]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    [row] = json.loads(rows_path.read_text())
    assert (row["client"], row["runners"], row["exit_code"]) == ("bem-runner", 2, 0)
    assert (row["delivered"], row["duplicates"], row["never_sent"]) == (20, 0, 0)
    assert "| bem-runner ×2 |" in completed.stdout
