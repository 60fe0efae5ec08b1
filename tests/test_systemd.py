"""The unit files: ``systemd-analyze verify`` accepts them and their exposure is at most 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
HOST_UNITS = Path("/usr/lib/systemd/system")
SERVICES = ("bem-runner.service", "bem-runner@.service", "bem-runner-drain.service")
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


def settings(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A file-system root holding the units, stand-ins for their binaries and the host's
    standard units (targets), so ``verify`` runs without installing anything."""
    if not (HOST_UNITS / "sysinit.target").exists():
        pytest.skip(f"no systemd units in {HOST_UNITS} to verify against")
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(HOST_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    for binary in ("usr/local/bin/bem-runner", "usr/bin/kill"):
        path = tmp_path / binary
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    target = tmp_path / "etc/systemd/system"
    target.mkdir(parents=True)
    for unit in UNITS.iterdir():
        if unit.is_dir():  # drop-ins
            shutil.copytree(unit, target / unit.name)
        else:
            shutil.copy(unit, target / unit.name)
    return tmp_path


@needs_analyze
def test_units_verify(root: Path) -> None:
    units = [
        "bem-runner.service",
        "bem-runner@inbox.service",
        "bem-runner-drain.service",
        "bem-runner-drain.timer",
    ]
    done = analyze("verify", "--man=no", "--generators=no", f"--root={root}", *units)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@needs_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_exposure_is_at_most_two(unit: str) -> None:
    done = analyze(
        "security",
        "--offline=true",
        f"--threshold={round(MAX_EXPOSURE * 10)}",
        "--no-pager",
        str(UNITS / unit),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert level is not None, done.stdout
    assert float(level.group(1)) <= MAX_EXPOSURE


@pytest.mark.parametrize("unit", ["bem-runner.service", "bem-runner@.service"])
def test_daemon_unit_is_a_notify_service_with_watchdog_and_credentials(unit: str) -> None:
    found = settings(unit)
    assert found["Type"] == ["notify"]
    assert found["WatchdogSec"] == ["30s"]
    assert found["Restart"] == ["on-failure"]
    assert found["KillMode"] == ["mixed"]
    assert found["UMask"] == ["0077"]
    assert found["LoadCredential"] == ["api-key:/etc/bem-runner/api-key"]
    assert "Environment" not in found
    assert "StartLimitBurst" in found
    assert "RestartSec" in found
    assert "StateDirectory" in found
    assert "ConfigurationDirectory" in found
    assert "kill -HUP $MAINPID" in found["ExecReload"][0]
    stop = int(found["TimeoutStopSec"][0].removesuffix("s"))
    assert stop > 30, "TimeoutStopSec must leave room for service.graceful_timeout (30s)"


def test_drain_unit_is_one_shot_and_its_timer_starts_it() -> None:
    drain = settings("bem-runner-drain.service")
    assert drain["Type"] == ["oneshot"]
    assert " drain" in drain["ExecStart"][0]
    assert "Environment" not in drain
    timer = settings("bem-runner-drain.timer")
    assert timer["Unit"] == ["bem-runner-drain.service"]
    assert timer["OnCalendar"]


POSTGRESQL_DROP_IN = "bem-runner.service.d/postgresql.conf"


@needs_analyze
def test_the_postgresql_drop_in_verifies_with_its_unit(root: Path) -> None:
    done = analyze("verify", "--man=no", "--generators=no", f"--root={root}", "bem-runner.service")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # verify reads the drop-in: a key it does not know is reported


def test_the_postgresql_drop_in_orders_after_a_local_server_and_hands_over_the_password() -> None:
    found = settings(POSTGRESQL_DROP_IN)
    assert found["Wants"] == ["postgresql.service"]
    assert found["After"] == ["postgresql.service"]
    assert found["LoadCredential"] == ["store-password:/etc/bem-runner/store-password"]
    assert "Environment" not in found  # the URL is in the config, its password a credential
    assert set(found) == {"Wants", "After", "LoadCredential"}


@needs_analyze
def test_exposure_with_the_postgresql_drop_in_is_at_most_two(tmp_path: Path) -> None:
    unit = tmp_path / "bem-runner.service"
    unit.write_text(
        (UNITS / "bem-runner.service").read_text() + "\n" + (UNITS / POSTGRESQL_DROP_IN).read_text()
    )
    done = analyze(
        "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}", "--no-pager",
        str(unit),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert level is not None, done.stdout
    assert float(level.group(1)) <= MAX_EXPOSURE
