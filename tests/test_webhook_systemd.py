"""The units with the webhook receiver's credentials enabled: still at exposure <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
DAEMONS = ("bem-runner.service", "bem-runner@.service", "bem-runner-drain.service")
CREDENTIALS = (
    "LoadCredential=webhook-secret:/etc/bem-runner/webhook-secret",
    "LoadCredential=webhook-previous-secret:/etc/bem-runner/webhook-previous-secret",
)


def enabled(unit: str) -> str:
    text = (UNITS / unit).read_text()
    for line in CREDENTIALS:
        assert f"\n#{line}\n" in text, f"{unit}: the webhook credential is offered"
        text = text.replace(f"#{line}", line)
    return text


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", DAEMONS)
def test_exposure_with_the_receiver_is_at_most_two(unit: str, tmp_path: Path) -> None:
    assert ANALYZE is not None
    path = tmp_path / unit
    path.write_text(enabled(unit))
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--threshold=20", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert level is not None, done.stdout
    assert float(level.group(1)) <= 2.0
