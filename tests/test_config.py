from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import msgspec.structs
import pytest

from runner.config import (
    ApiConfig,
    InboxConfig,
    LimitsConfig,
    PollConfig,
    ServiceConfig,
    StoreConfig,
    WebhookConfig,
    load_config,
)
from runner.errors import ConfigError
from runner.policy import parse_duration
from runner.route import Route
from runner.startup import reloadable


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


@pytest.mark.parametrize(
    ("toml", "instead"),
    [
        ('api_key = "k"', "BEM_API_KEY"),
        ('webhook_secrets = ["whsec_x"]', "webhook.secret_file"),
        ('store_url = "postgresql://h/db"', "BEM_RUNNER_STORE_URL"),
    ],
)
def test_secrets_in_the_file_are_refused(tmp_path: Path, toml: str, instead: str) -> None:
    with pytest.raises(ConfigError, match=rf"is not a setting; use .*{instead}"):
        load_config(write(tmp_path, toml + "\n"), environ={})


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ('[inbox]\non_done = "shred"', "inbox.on_done: must be one of 'archive', 'delete', 'keep'"),
        ("[limits]\nburst = 1.0", "limits.burst: must be a whole number (got 1.0)"),
        ('[limits]\nrequests_per_second = "10"', "limits.requests_per_second: must be a number"),
        ("[limits]\nmax_concurrency = 0", "limits.max_concurrency: must be >= 1 (got 0)"),
        ("[inbox]\nrescan_seconds = 0", "inbox.rescan_seconds: must be >= 0.01 (got 0)"),
        ("[limits]\nrequests_per_second = nan", "limits.requests_per_second: must be a finite"),
        ("[api]\ntimeout_seconds = 0", "api.timeout_seconds: must be > 0 (got 0)"),
        ("[poll]\ngive_up_after = true", 'must be a number of seconds or a duration such as "30s"'),
        ("[poll]\ngive_up_after = " + "9" * 30, "poll.give_up_after: must be <= 7776000"),
        ("[poll]\ninitial_seconds = 5\nmax_seconds = 1", "must be >= poll.initial_seconds (got 1)"),
        ('[store]\nrunner_id = "' + "r" * 201 + '"', "store.runner_id: must be at most 200"),
        ("paths = 5", "paths: must be a table ([paths] in TOML) (got 5)"),
        ("route = [1]", "route.0: must be a table ([[route]] in TOML) (got 1)"),
        ('[[route]]\nworkflow = "w"', "route.0.glob: is required"),
        ('[route]\nglob = "a/**"', "route: must be an array of tables: write each route as"),
    ],
)
def test_errors_say_what_the_key_must_be(tmp_path: Path, toml: str, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, toml + "\n"), environ={})
    assert line in caught.value.message


def test_only_the_first_problem_is_told(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nburst = 0\nmax_concurrency = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.message.count("\n") == 1
    assert "limits.burst: must be >= 1 (got 0)" in caught.value.message


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
    assert "sekrit-123" not in str(msgspec.to_builtins(config, enc_hook=str))


def test_unreadable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, f'[api]\napi_key_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(ConfigError, match="cannot read API key file"):
        load_config(path, environ={})


def test_routes_are_built_once_at_load(tmp_path: Path) -> None:
    path = write(tmp_path, '[[route]]\nglob = "a/**"\nworkflow = "w"\n')
    config = load_config(path, environ={})
    assert config.routes is config.routes
    assert isinstance(config.routes[0], Route)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (
            '[[route]]\nglob = "a/**"\nworkflow = "w"\nbatch_window_seconds = 0',
            "route.0.batch_window_seconds",
        ),
        ('[[route]]\nglob = "/"\nworkflow = "w"', "route.0.glob"),
        ('[[route]]\nglob = "a/**"\nworkflow = ".."', "route.0.workflow"),
        ('[[route]]\nglob = "a/**"\nworkflow = "a/b"', "route.0.workflow"),
        (
            '[[route]]\nglob = "a/**"\nworkflow = "w"\n[[route]]\nglob = ".x/*"\nworkflow = "w"',
            "route.1.glob",
        ),
        ('[[route]]\nglob = "a/**"\nworkflow = "w"\ncolour = 1', "route.0.colour"),
        ('[route]\nglob = "a/**"\nworkflow = "w"', "route"),
        ("route = [1]", "route.0"),
        ("[limits]\nrequests_per_second = inf", "limits.requests_per_second"),
        ("[limits]\nrequests_per_second = nan", "limits.requests_per_second"),
        ("[limits]\nrequests_per_second = true", "limits.requests_per_second"),
        ('[limits]\nrequests_per_second = "10"', "limits.requests_per_second"),
        ("[limits]\nrequests_per_second = 0", "limits.requests_per_second"),
        ("[limits]\nburst = 1.0", "limits.burst"),
        ("[limits]\nmax_open_calls = 99999999999999999999", "limits.max_open_calls"),
        ("[limits]\nmax_concurrency = false", "limits.max_concurrency"),
        ("[poll]\ninitial_seconds = 1e300", "poll.initial_seconds"),
        ("[poll]\nmax_seconds = -0.0", "poll.max_seconds"),
        ("[poll]\ngive_up_after = 1e300", "poll.give_up_after"),
        ("[poll]\ngive_up_after = 0", "poll.give_up_after"),
        ("[poll]\ngive_up_after = true", "poll.give_up_after"),
        ("[poll]\ngive_up_after = " + "9" * 400, "poll.give_up_after"),
        ('[poll]\ngive_up_after = "9999999999w"', "poll.give_up_after"),
        ("[poll]\ninitial_seconds = 5.0\nmax_seconds = 1.0", "poll.max_seconds"),
        ("[api]\ntimeout_seconds = inf", "api.timeout_seconds"),
        ('[api]\nvisibility_window = "inf"', "api.visibility_window"),
        ("[api]\nmultipart_min_bytes = -1", "api.multipart_min_bytes"),
        ("[inbox]\nrescan_seconds = 0", "inbox.rescan_seconds"),
        ("[inbox]\nsettle_seconds = 1e9", "inbox.settle_seconds"),
        ('[inbox]\nmax_file_bytes = "100MB"', "inbox.max_file_bytes"),
        ('[service]\ngraceful_timeout = "2d"', "service.graceful_timeout"),
        ("[service]\nmetrics_addr = 9464", "service.metrics_addr"),
        ('[service]\nmetrics_addr = "localhost"', "service.metrics_addr"),
        ('[service]\nmetrics_addr = "localhost:65536"', "service.metrics_addr"),
        ('[service]\nmetrics_addr = "localhost:٩٤"', "service.metrics_addr"),
        ('[service]\nmetrics_addr = "bad host:9464"', "service.metrics_addr"),
        ('[service]\nmetrics_addr = "[nope]:9464"', "service.metrics_addr"),
        ("paths = 5", "paths"),
        ('[paths]\ninbox = ""', "paths.inbox"),
        ("[paths]\ninbox = 3", "paths.inbox"),
        ('[paths]\nstate = "a\\u0000b"', "paths.state"),
        ('[api]\nbase_url = "ftp://x"', "api.base_url"),
        ('[api]\nbase_url = "https://"', "api.base_url"),
        ('[api]\nbase_url = "https://x?q=1"', "api.base_url"),
        ('[api]\nbase_url = "https://x/#frag"', "api.base_url"),
        ('[api]\nbase_url = "https://x:99999"', "api.base_url"),
        ('[api]\nbase_url = "https://x:0"', "api.base_url"),
        ('[api]\nbase_url = "https://[::1"', "api.base_url"),
        ('[api]\nbase_url = "https://x y"', "api.base_url"),
        ('[api]\nbase_url = "https://bém.ai"', "api.base_url"),
        ("[api]\nbase_url = 1", "api.base_url"),
    ],
)
def test_values_that_could_not_run_are_refused_naming_the_key(
    tmp_path: Path, toml: str, key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, toml + "\n"), environ={})
    assert key in caught.value.message


def test_credentials_in_the_base_url_are_refused_and_not_shown(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nbase_url = "https://me:hunter22@x"\n')
    with pytest.raises(ConfigError, match=r"api\.base_url: must not carry credentials") as caught:
        load_config(path, environ={})
    assert "hunter22" not in caught.value.message
    with pytest.raises(ConfigError, match="BEM_BASE_URL") as caught:
        load_config(None, environ={"BEM_BASE_URL": "https://me:hunter22@x"})
    assert "hunter22" not in caught.value.message


@pytest.mark.parametrize("url", ["nope", "ftp://x", "http://", "https://x?y", "https://a b"])
def test_a_bad_base_url_from_the_environment_names_the_variable(url: str) -> None:
    with pytest.raises(ConfigError, match="BEM_BASE_URL") as caught:
        load_config(None, environ={"BEM_BASE_URL": url})
    assert "api.base_url" not in caught.value.message


def test_good_base_urls_and_metrics_addresses_load() -> None:
    for url, expected in [
        ("http://127.0.0.1:9", "http://127.0.0.1:9"),
        ("https://api.bem.ai/", "https://api.bem.ai"),
        ("http://[::1]:8080/prefix", "http://[::1]:8080/prefix"),
    ]:
        assert load_config(None, environ={"BEM_BASE_URL": url}).api.base_url == expected
    for address in ["127.0.0.1:9464", ":9464", "[::1]:0", "metrics.local:65535"]:
        overrides = {"service.metrics_addr": address}
        assert load_config(None, environ={}, overrides=overrides).service.metrics_addr == address


def test_config_files_that_are_not_text_are_config_errors(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[api]\nbase_url = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xFF"):
        load_config(binary, environ={})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})
    with pytest.raises(ConfigError, match="BEM_RUNNER_CONFIG"):
        load_config(None, environ={"BEM_RUNNER_CONFIG": str(tmp_path / "missing.toml")})
    deep = write(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(deep, environ={})
    digits = write(tmp_path, "[limits]\nburst = " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(digits, environ={})
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[limits]\nburst = 3\n")
    assert load_config(bom, environ={}).limits.burst == 3


def test_a_flag_for_a_section_that_is_not_a_table_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "paths = 5\n")
    with pytest.raises(ConfigError, match="paths: must be a table"):
        load_config(path, environ={}, overrides={"paths.inbox": Path("/in")})


# -- paths ------------------------------------------------------------------------------------


def test_every_path_is_resolved_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    path = write(tmp_path, '[paths]\ninbox = "in"\noutbox = "./x/../out"\narchive = "alias/arch"\n')
    config = load_config(path, environ={}, overrides={"paths.state": Path("st/state.db")})
    paths = config.paths
    assert paths.inbox == tmp_path.resolve() / "in"
    assert paths.outbox == tmp_path.resolve() / "out"
    assert paths.archive == tmp_path.resolve() / "real" / "arch"
    assert paths.state == tmp_path.resolve() / "st" / "state.db"
    home = load_config(None, environ={}, overrides={"paths.inbox": Path("~/in")}).paths.inbox
    assert home == (Path.home() / "in").resolve()


def test_paths_in_a_config_file_are_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documented in config/bem-runner.toml: as for flags, not relative to the file."""
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", '[paths]\ninbox = "in"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(path, environ={}).paths.inbox == tmp_path.resolve() / "in"


def test_the_quickstart_config_loads_from_the_repository_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    config = load_config(Path("config/quickstart.toml"), environ={})
    assert config.paths.inbox == root / "examples" / "inbox"
    assert config.paths.outbox == root / "out" / "outbox"
    assert all(p.is_absolute() for p in msgspec.structs.astuple(config.paths))


@pytest.mark.parametrize(
    ("paths", "keys"),
    [
        ({"inbox": "in", "outbox": "in/wf/results"}, ("paths.outbox", "paths.inbox")),
        ({"inbox": "box", "outbox": "box"}, ("paths.inbox", "paths.outbox")),
        ({"inbox": "box/in", "outbox": "box"}, ("paths.inbox", "paths.outbox")),
        ({"inbox": "in", "outbox": "out", "archive": "in/done"}, ("paths.archive", "paths.inbox")),
        ({"inbox": "in", "outbox": "out", "archive": "out/a"}, ("paths.archive", "paths.outbox")),
        ({"inbox": "in", "outbox": "./out/../in"}, ("paths.inbox", "paths.outbox")),
        ({"inbox": "in", "outbox": "in-alias/results"}, ("paths.outbox", "paths.inbox")),
        ({"inbox": "in", "state": "in/state.db"}, ("paths.state", "paths.inbox")),
        ({"inbox": "in", "state": "in"}, ("paths.state", "paths.inbox")),
        ({"inbox": "in", "outbox": "out", "state": "out"}, ("paths.state", "paths.outbox")),
    ],
)
def test_overlapping_folders_are_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, paths: dict[str, str], keys: tuple[str, str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in-alias").symlink_to(tmp_path / "in")
    defaults = {"outbox": "out", "archive": "arch", "state": "state.db"}
    overrides = {f"paths.{k}": Path(v) for k, v in (defaults | paths).items()}
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={}, overrides=overrides)
    message = caught.value.message
    for key in keys:
        assert key in message
    for key in keys:
        name = key.removeprefix("paths.")
        assert str((tmp_path / (defaults | paths)[name]).resolve()) in message


def test_the_archive_may_overlap_only_when_it_is_not_used(tmp_path: Path) -> None:
    overrides: dict[str, object] = {
        "paths.inbox": tmp_path / "in",
        "paths.outbox": tmp_path / "out",
        "paths.archive": tmp_path / "in" / "archive",
    }
    for on_done in ("keep", "delete"):
        load_config(None, environ={}, overrides={**overrides, "inbox.on_done": on_done})
    with pytest.raises(ConfigError, match=r"paths\.archive"):
        load_config(None, environ={}, overrides={**overrides, "inbox.on_done": "archive"})


def test_every_numeric_bound_is_documented_in_the_example_config() -> None:
    """Each number setting's accepted range is written beside it in config/bem-runner.toml."""
    documented = _documented_ranges(Path(__file__).parent.parent / "config" / "bem-runner.toml")
    models: dict[str, type[msgspec.Struct]] = {
        "api": ApiConfig,
        "limits": LimitsConfig,
        "inbox": InboxConfig,
        "poll": PollConfig,
        "service": ServiceConfig,
        "store": StoreConfig,
        "webhook": WebhookConfig,
        "route": Route,
    }
    expected = {
        f"{section}.{field.name}": bounds
        for section, model in models.items()
        for field in msgspec.structs.fields(model)
        if (bounds := _bounds(field.type)) is not None
    }
    assert documented.pop("service.metrics_addr") == ("[", 0, 65535)  # the port
    assert documented.pop("webhook.listen") == ("[", 0, 65535)
    assert documented == expected


def _bounds(kind: Any) -> tuple[str, float, float] | None:
    """A field's range as written in the example: ("[" or "(", low, high); None if unbounded."""
    metas = [item for item in getattr(kind, "__metadata__", ()) if isinstance(item, msgspec.Meta)]
    highs = [float(item.le) for item in metas if item.le is not None]
    if not highs:
        return None
    lows = [(float(item.ge), "[") for item in metas if item.ge is not None]
    lows += [(float(item.gt), "(") for item in metas if item.gt is not None]
    low, closed = max(lows, key=lambda bound: (bound[0], bound[1] == "("))  # gt beats an equal ge
    return closed, low, min(highs)


def _documented_ranges(path: Path) -> dict[str, tuple[str, float, float]]:
    ranges: dict[str, tuple[str, float, float]] = {}
    section = key = ""
    bound = re.compile(r"([\[(])([\d_.]+[a-z]?), ([\d_.]+[a-z]?)\]\s*$")
    for line in path.read_text().splitlines():
        if match := re.match(r"#? ?\[+(\w+)\]+", line):
            section = match.group(1)
        elif match := re.match(r"#? ?(\w+) = ", line):
            key = f"{section}.{match.group(1)}"
        if (found := bound.search(line)) and key:
            closed, low, high = found.groups()
            ranges[key] = (closed, _number(low), _number(high))
    return ranges


def _number(text: str) -> float:
    return parse_duration(text.replace("_", ""))


def test_an_existing_path_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    for key in ("inbox", "outbox", "archive"):
        with pytest.raises(ConfigError, match=rf"paths\.{key} .* is not a folder"):
            load_config(None, environ={}, overrides={f"paths.{key}": tmp_path / "file"})
    with pytest.raises(ConfigError, match=r"paths\.state .* is a folder"):
        load_config(None, environ={}, overrides={"paths.state": tmp_path / "folder"})


# -- reload -----------------------------------------------------------------------------------


def test_a_reload_that_would_archive_into_the_running_inbox_is_refused(tmp_path: Path) -> None:
    """Paths are kept from the start; a new [inbox] that does not go with them is refused."""
    running = load_config(
        None,
        environ={},
        overrides={
            "paths.inbox": tmp_path / "in",
            "paths.outbox": tmp_path / "out",
            "paths.archive": tmp_path / "in" / "done",
            "inbox.on_done": "keep",
        },
    )
    fresh = load_config(
        None,
        environ={},
        overrides={"paths.inbox": tmp_path / "elsewhere", "limits.burst": 3},
    )
    assert fresh.inbox.on_done == "archive"
    with pytest.raises(ConfigError, match=r"paths\.archive .* is inside paths\.inbox") as caught:
        reloadable(running, fresh)
    assert " - at `" not in caught.value.message
    applied = reloadable(running, msgspec.structs.replace(fresh, inbox=running.inbox))
    assert (applied.paths, applied.limits.burst) == (running.paths, 3)
