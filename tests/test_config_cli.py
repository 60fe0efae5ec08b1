"""Bad configuration as a user meets it on the command line: exit 2, the key named, no traceback,
and never a secret's value."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_cli import bem_runner

SECRET_TAIL = "X-Injected: 1"


@pytest.mark.parametrize(
    ("toml", "env", "args", "named"),
    [
        (b"[limits]\nrequests_per_second = inf\n", {}, [], "limits.requests_per_second"),
        (b"[limits]\nrequests_per_second = true\n", {}, [], "limits.requests_per_second"),
        (b"[poll]\ninitial_seconds = 1e300\n", {}, [], "poll.initial_seconds"),
        (b"[limits]\nmax_open_calls = 99999999999999999999\n", {}, [], "limits.max_open_calls"),
        (b'[[route]]\nglob = "/"\nworkflow = "w"\n', {}, [], "route.0.glob"),
        (
            b'[[route]]\nglob = "a/**"\nworkflow = "w"\nbatch_window_seconds = 0\n',
            {},
            [],
            "route.0.batch_window_seconds",
        ),
        (b'[api]\nbase_url = "\xff"\n', {}, [], "not UTF-8"),
        (b"", {"BEM_BASE_URL": "api.bem.ai"}, [], "BEM_BASE_URL"),
        (b"", {"BEM_API_KEY": f"K\r\n{SECRET_TAIL}"}, [], "BEM_API_KEY"),
        (b"", {"BEM_API_KEY": "clé-secrète"}, [], "BEM_API_KEY"),
        (b"", {}, ["--outbox", "inbox/wf/results"], "paths.outbox"),
    ],
)
def test_a_config_that_cannot_run_is_exit_2_naming_the_key(
    tmp_path: Path, toml: bytes, env: dict[str, str], args: list[str], named: str
) -> None:
    config = tmp_path / "bem-runner.toml"
    config.write_bytes(toml)
    local = ["--inbox", "inbox", "--archive", "archive", "--state", "state.db"]
    outbox = [] if "--outbox" in args else ["--outbox", "outbox"]
    done = bem_runner(
        "--config", str(config), "drain", *local, *outbox, *args, env=env, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert SECRET_TAIL not in done.stderr + done.stdout
    assert "secrète" not in done.stderr + done.stdout
    assert not (tmp_path / "state.db").exists()


def test_a_directory_as_config_file_is_exit_2(tmp_path: Path) -> None:
    done = bem_runner("--config", str(tmp_path), "status", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "is a directory" in done.stderr
    assert "Traceback" not in done.stderr
