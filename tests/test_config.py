from __future__ import annotations

from pathlib import Path

import pytest

from runner.config import load_config
from runner.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bem-runner.toml"
    path.write_text(text)
    return path


def test_defaults_are_safe_and_complete() -> None:
    config = load_config(None, environ={})
    assert config.api.base_url == "https://api.bem.ai"
    assert config.api.version == "v3"
    assert config.inbox.on_done == "archive"
    assert config.poll.give_up_after == 86_400
    assert config.api_key is None
    assert config.routes == ()


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "config" / "bem-runner.toml"
    config = load_config(example, environ={})
    assert config.limits.requests_per_second == 10


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nrequests_per_secnd = 5\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'limits.requests_per_secnd'"):
        load_config(path, environ={})


def test_bad_value_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[inbox]\non_done = "shred"\n')
    with pytest.raises(ConfigError, match=r"inbox.on_done"):
        load_config(path, environ={})
    path = write(tmp_path, '[poll]\ngive_up_after = "soon"\n')
    with pytest.raises(ConfigError, match=r"poll.give_up_after"):
        load_config(path, environ={})


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[api\n"), environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_key_in_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BEM_API_KEY"):
        load_config(write(tmp_path, 'api_key = "k"\n'), environ={})


def test_routes_and_durations(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[poll]
give_up_after = "1h30m"
[[route]]
glob = "invoices/**"
workflow = "invoice-extract"
group = "folder"
""",
    )
    config = load_config(path, environ={})
    assert config.poll.give_up_after == 5400
    (route,) = config.routes
    assert (route.glob, route.workflow, route.group) == ("invoices/**", "invoice-extract", "folder")


def test_environment_and_flags_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nbase_url = "https://file.example"\n[paths]\ninbox = "/a"\n')
    env = {"BEM_BASE_URL": "http://127.0.0.1:9", "BEM_RUNNER_CONFIG": str(path)}
    config = load_config(None, environ=env, overrides={"paths.inbox": "/b", "paths.outbox": None})
    assert config.api.base_url == "http://127.0.0.1:9"
    assert config.paths.inbox == Path("/b")
    assert config.paths.outbox == Path("/var/lib/bem-runner/outbox")


def test_api_key_sources_in_order(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-key").write_text("from-systemd\n")
    path = write(tmp_path, f'[api]\napi_key_file = "{key_file}"\n')

    def key(p: Path | None, env: dict[str, str]) -> str | None:
        secret = load_config(p, environ=env).api_key
        return secret.get_secret_value() if secret else None

    assert key(path, {"BEM_API_KEY": "from-env"}) == "from-env"
    assert key(path, {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-file"
    assert key(None, {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-systemd"
    assert key(None, {}) is None
    # the key is never in the config's repr or dump
    config = load_config(None, environ={"BEM_API_KEY": "sekrit-123"})
    assert "sekrit-123" not in repr(config)
    assert "sekrit-123" not in config.model_dump_json()


def test_unreadable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, f'[api]\napi_key_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(ConfigError, match="cannot read API key file"):
        load_config(path, environ={})
