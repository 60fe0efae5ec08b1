"""Secrets are checked at load for what an HTTP header can carry, and never shown."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.config import load_config
from runner.credentials import (
    MAX_SECRET_CHARS,
    Secret,
    SecretSource,
    resolve_secret,
    secret_problem,
)
from runner.errors import ConfigError

CONTROL = [chr(c) for c in [*range(0x20), 0x7F]]
SURROUNDING = " \t\r\n\v\f"
VISIBLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
WEBHOOK = SecretSource(
    what="webhook secret",
    env_var="BEM_WEBHOOK_SECRET",
    file_key="webhook.secret_file",
    credential="webhook-secret",
)


def key_from(tmp_path: Path, *, env: str | None = None, file: bytes | None = None) -> str | None:
    environ: dict[str, str] = {}
    if env is not None:
        environ["BEM_API_KEY"] = env
    if file is not None:
        creds = tmp_path / "creds"
        creds.mkdir(exist_ok=True)
        (creds / "api-key").write_bytes(file)
        environ["CREDENTIALS_DIRECTORY"] = str(creds)
    secret = load_config(None, environ=environ).api_key
    return secret.get_secret_value() if secret is not None else None


def assert_refused(
    tmp_path: Path,
    secret: str,
    *,
    env: str | None = None,
    file: bytes | None = None,
    source: str,
    kind: str,
) -> None:
    with pytest.raises(ConfigError) as caught:
        key_from(tmp_path, env=env, file=file)
    message = caught.value.message
    assert source in message
    assert kind in message
    for part in secret.split():
        if len(part) >= 3:
            assert part not in message, "a secret's value must never be shown"


@pytest.mark.parametrize("char", CONTROL)
def test_every_control_character_inside_an_env_key_is_refused(tmp_path: Path, char: str) -> None:
    secret = f"sk-abc{char}X: 1"
    kind = "a space" if char == " " else f"control character (U+{ord(char):04X})"
    assert_refused(tmp_path, secret, env=secret, source="BEM_API_KEY", kind=kind)


@pytest.mark.parametrize("char", CONTROL)
def test_every_control_character_inside_a_key_file_is_refused(tmp_path: Path, char: str) -> None:
    secret = f"sk-abc{char}def"
    assert_refused(
        tmp_path,
        secret,
        file=secret.encode(),
        source="$CREDENTIALS_DIRECTORY/api-key",
        kind=f"control character (U+{ord(char):04X})",
    )


def test_the_reported_key_file_is_the_configured_one(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"line-one\nline-two\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[api]\napi_key_file = "{key_file}"\n')
    with pytest.raises(ConfigError, match=r"api\.api_key_file") as caught:
        load_config(config, environ={})
    assert str(key_file) in caught.value.message
    assert "U+000A" in caught.value.message
    assert "line-one" not in caught.value.message


@given(
    secret=VISIBLE, before=st.text(SURROUNDING, max_size=3), after=st.text(SURROUNDING, max_size=3)
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
def test_surrounding_whitespace_and_a_trailing_newline_are_stripped(
    tmp_path: Path, secret: str, before: str, after: str
) -> None:
    assert key_from(tmp_path, env=before + secret + after) == secret
    assert key_from(tmp_path, file=(before + secret + after).encode()) == secret
    assert key_from(tmp_path, file=(secret + "\r\n").encode()) == secret


@given(
    head=VISIBLE,
    bad=st.characters(blacklist_categories=["Cs"]).filter(lambda c: not 0x21 <= ord(c) <= 0x7E),
    tail=VISIBLE,
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=100)
def test_any_character_a_header_cannot_carry_is_refused_wherever_it_comes_from(
    tmp_path: Path, head: str, bad: str, tail: str
) -> None:
    secret = head + bad + tail
    with pytest.raises(ConfigError, match="BEM_API_KEY") as from_env:
        key_from(tmp_path, env=secret)
    with pytest.raises(ConfigError, match="api-key") as from_file:
        key_from(tmp_path, file=secret.encode("utf-8"))
    for caught in (from_env, from_file):
        assert f"position {len(head)}" in caught.value.message
        assert secret not in caught.value.message
        assert tail not in caught.value.message or len(tail) < 3


@given(data=st.binary(min_size=1, max_size=64))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=100)
def test_any_bytes_in_a_key_file_give_a_key_a_header_carries_or_a_config_error(
    tmp_path: Path, data: bytes
) -> None:
    stripped = data.strip(b" \t\r\n\v\f")
    if not stripped or any(not 0x21 <= byte <= 0x7E for byte in stripped):
        with pytest.raises(ConfigError, match="api-key"):
            key_from(tmp_path, file=data)
        return
    key = key_from(tmp_path, file=data)
    assert key == stripped.decode()
    httpx.Headers({"Authorization": f"Bearer {key}", "x-api-key": key})  # never raises


@given(text=st.text(max_size=30))
def test_secret_problem_agrees_with_what_a_header_can_carry(text: str) -> None:
    problem = secret_problem(text)
    header_safe = bool(text) and all(0x21 <= ord(c) <= 0x7E for c in text)
    assert (problem is None) == header_safe


def test_a_secret_that_is_too_long_or_blank_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"longer than {MAX_SECRET_CHARS}"):
        key_from(tmp_path, env="k" * (MAX_SECRET_CHARS + 1))
    with pytest.raises(ConfigError, match="empty"):
        key_from(tmp_path, env=" \r\n")
    with pytest.raises(ConfigError, match="empty"):
        key_from(tmp_path, file=b"\n")
    assert key_from(tmp_path, env="") is None  # BEM_API_KEY= counts as unset


def test_non_utf8_bytes_in_a_key_file_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="non-ASCII byte at position 2"):
        key_from(tmp_path, file=b"sk\xff\xfe")


def test_the_same_resolution_serves_any_future_secret(tmp_path: Path) -> None:
    """One validator for every secret: a webhook secret is read and checked the same way."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "webhook-secret").write_bytes(b"whsec_abc\r\n")
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    secret = resolve_secret(WEBHOOK, environ=environ, file=None)
    assert secret is not None
    assert secret.get_secret_value() == "whsec_abc"
    with pytest.raises(ConfigError, match=r"BEM_WEBHOOK_SECRET contains a control character"):
        resolve_secret(WEBHOOK, environ={"BEM_WEBHOOK_SECRET": "a\nb"}, file=None)
    # another secret's credential missing is not an error: that secret is simply not set
    assert (
        resolve_secret(WEBHOOK, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}, file=None) is None
    )


def test_a_secret_is_handed_over_on_request_and_never_shown() -> None:
    secret = Secret("sk-live-123")
    assert secret.get_secret_value() == "sk-live-123"
    for shown in (repr(secret), str(secret), f"{secret}", repr([secret]), repr({"k": secret})):
        assert "sk-live-123" not in shown
    assert secret == Secret("sk-live-123")
    assert secret != Secret("sk-live-124")
    assert secret != "sk-live-123"
    assert len({secret, Secret("sk-live-123")}) == 1
