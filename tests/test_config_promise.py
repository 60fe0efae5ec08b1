"""The promise of the configuration, tried over arbitrary input: every config that loads runs;
everything else is a ConfigError naming the key; never any other exception.

Arbitrary TOML values (huge integers, inf/nan/1e300/-0.0, booleans, strings, lists, tables) go to
every key of every section, to unknown keys and in place of whole sections; the environment
varies too. A config that loads must build what the runner builds from it without raising and
without an infinite or NaN wait.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runner.clock import FakeClock
from runner.config import Config, load_config
from runner.errors import ConfigError
from runner.metrics import parse_address
from runner.policy import parse_duration, poll_delay, retry_delay
from runner.ratelimit import RateLimiter
from runner.route import route_file, workflow_name_problem
from runner.startup import limits_for

from .conftest import toml_document

SQLITE_MAX = 2**63 - 1
SAMPLE_FILES = ["a.pdf", "wf/a.pdf", "wf/b/c.txt", "x/y/z/w.csv", "in/scans/s1/p.png"]
DURATION_KEYS = {
    ("api", "visibility_window"),
    ("api", "unreachable_timeout"),
    ("poll", "give_up_after"),
    ("service", "graceful_timeout"),
}

# -- arbitrary TOML values ---------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
scalars = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([0, 1, -1, 2**63, 2**64, 10**20, 99999999999999999999]),
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e300, -0.0, 5e-324, 0.5, 1e-300]),
    st.booleans(),
    text,
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)

plausible_numbers = st.one_of(
    st.integers(min_value=-5, max_value=200_000),
    st.floats(min_value=-1, max_value=200_000, allow_nan=False),
    st.sampled_from([0.001, 0.01, 0.1, 1, 30, 3600, 86_400, 10_000, 1_000_000, 10**10]),
)
plausible_durations = st.sampled_from(["30s", "1h30m", "0", "1.5d", "999w", "10ms", "", "-1s", "x"])
plausible_paths = st.sampled_from(
    ["in", "out", "arch", "state.db", "in/sub", "out/x", "in/state.db", "/tmp/bem-x", "~/bem", ""]
)
plausible_strings = st.sampled_from(
    [
        "https://api.bem.ai",
        "http://127.0.0.1:9",
        "http://[::1]:80/p",
        "https://u:p@h",
        "ftp://h",
        "http://h?q",
        "127.0.0.1:9464",
        ":0",
        "[::1]:9",
        "h:99999",
        "v2",
        "v3",
        "keep",
        "delete",
        "archive",
        "file",
        "folder",
        "window",
        "**",
        "a/**",
        "/",
        ".x/*",
        "*.tmp",
        "wf",
        "..",
        "a/b",
        "a\nb",
    ]
)
plausible = st.one_of(plausible_numbers, plausible_durations, plausible_paths, plausible_strings)
anything = st.one_of(plausible, plausible, values)

SECTIONS: dict[str, list[str]] = {
    "api": [
        "base_url",
        "version",
        "api_key_file",
        "timeout_seconds",
        "multipart_min_bytes",
        "v2_calls_per_request",
        "visibility_window",
        "unreachable_timeout",
    ],
    "limits": ["requests_per_second", "burst", "max_concurrency", "max_open_calls"],
    "paths": ["inbox", "outbox", "archive", "state"],
    "inbox": ["settle_seconds", "on_done", "max_file_bytes", "rescan_seconds", "dedupe"],
    "poll": ["initial_seconds", "max_seconds", "give_up_after", "calls_per_request"],
    "service": ["graceful_timeout", "metrics_addr"],
}
ROUTE_KEYS = [
    "glob",
    "workflow",
    "group",
    "batch_max_files",
    "batch_max_bytes",
    "batch_window_seconds",
]


def table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    known = st.fixed_dictionaries({}, optional={key: anything for key in keys})
    unknown = st.dictionaries(
        st.sampled_from(["colour", "api_key", keys[0] + "s"]), anything, max_size=1
    )
    return st.builds(lambda a, b: {**a, **b}, known, unknown | st.just({}))


routes = st.lists(
    st.builds(
        lambda base, extra: {**base, **extra},
        st.fixed_dictionaries({"glob": anything, "workflow": anything}),
        table(ROUTE_KEYS),
    ),
    max_size=3,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        **{name: table(keys) | scalars for name, keys in SECTIONS.items()},
        "route": routes | values,
        "extra": values,
    },
)
environments = st.fixed_dictionaries(
    {},
    optional={
        "BEM_API_KEY": st.one_of(text, st.just("sk-ok_1"), st.just(" sk-ok\r\n")),
        "BEM_BASE_URL": st.one_of(text, plausible_strings),
    },
)


def names_set(document: Mapping[str, Any], environ: Mapping[str, str]) -> set[str]:
    """Every name a message may use to point at something this input set."""
    names = set(environ)
    for name, value in document.items():
        names.add(name)
        if isinstance(value, dict):
            names.update(f"{name}.{key}" for key in value)
        if name == "route" and isinstance(value, list):
            names.update(f"route.{index}" for index in range(len(value)))
    return names


# -- the promise -----------------------------------------------------------------------------


@given(document=documents, environ=environments)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_config_either_runs_or_is_a_config_error_naming_the_key(
    document: dict[str, Any], environ: dict[str, str]
) -> None:
    outcome = load(toml_document(document), environ)
    if isinstance(outcome, ConfigError):
        event("config error")
        mentioned = [name for name in names_set(document, environ) if name in outcome.message]
        assert mentioned, outcome.message
    else:
        event("loaded")
        assert_usable(outcome)


def load(document: str, environ: Mapping[str, str]) -> Config | ConfigError:
    """The loaded configuration, or the ConfigError it raised; any other exception escapes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bem-runner.toml"
        path.write_text(document, encoding="utf-8")
        try:
            return load_config(path, environ=environ)
        except ConfigError as exc:
            return exc


def seconds_between(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=low, max_value=high) | st.sampled_from([low, high])


def duration_up_to(high: float) -> st.SearchStrategy[object]:
    spelled = [text for text in ("30s", "1h30m", "10ms", "0") if parse_duration(text) <= high]
    return seconds_between(0, high) | st.sampled_from(spelled)


def ordered_poll(pair: tuple[float, float]) -> dict[str, float]:
    return {"initial_seconds": min(pair), "max_seconds": max(pair)}


valid_route = st.fixed_dictionaries(
    {
        "glob": st.sampled_from(["**", "a/**", "wf/*.pdf", "in/scans/*/**", "**/*.txt", "x/"]),
        "workflow": st.sampled_from(["wf", "invoice-extract", "My Flow v2", "ünï"]),
    },
    optional={
        "group": st.sampled_from(["file", "folder", "window"]),
        "batch_max_files": st.integers(1, 10_000),
        "batch_max_bytes": st.integers(1, 10**10),
        "batch_window_seconds": st.floats(min_value=1e-9, max_value=86_400),
    },
)
valid_documents = st.fixed_dictionaries(
    {
        "api": st.fixed_dictionaries(
            {},
            optional={
                "base_url": st.sampled_from(
                    ["https://api.bem.ai", "http://127.0.0.1:9", "http://[::1]:80/p/", "http://h"]
                ),
                "version": st.sampled_from(["v2", "v3"]),
                "timeout_seconds": seconds_between(1e-9, 3600),
                "multipart_min_bytes": st.integers(0, 10**10),
                "v2_calls_per_request": st.integers(1, 100),
                "visibility_window": duration_up_to(86_400),
                "unreachable_timeout": duration_up_to(7 * 86_400),
            },
        ),
        "limits": st.fixed_dictionaries(
            {},
            optional={
                "requests_per_second": seconds_between(0.01, 10_000),
                "burst": st.integers(1, 10_000),
                "max_concurrency": st.integers(1, 1024),
                "max_open_calls": st.integers(1, 1_000_000),
            },
        ),
        "paths": st.just({"inbox": "in", "outbox": "out", "archive": "arch", "state": "s.db"}),
        "inbox": st.fixed_dictionaries(
            {},
            optional={
                "settle_seconds": seconds_between(0, 3600),
                "on_done": st.sampled_from(["archive", "delete", "keep"]),
                "max_file_bytes": st.integers(1, 10**10),
                "rescan_seconds": seconds_between(0.01, 86_400),
                "dedupe": st.sampled_from(["off", "content"]),
            },
        ),
        "poll": st.builds(
            lambda times, more: {**ordered_poll(times), **more},
            st.tuples(seconds_between(0.001, 3600), seconds_between(0.001, 3600)),
            st.fixed_dictionaries(
                {},
                optional={
                    "give_up_after": st.floats(min_value=1e-9, max_value=90 * 86_400)
                    | st.just("24h"),
                    "calls_per_request": st.integers(1, 100),
                },
            ),
        ),
        "service": st.fixed_dictionaries(
            {},
            optional={
                "graceful_timeout": duration_up_to(3600),
                "metrics_addr": st.sampled_from(
                    ["127.0.0.1:9464", ":0", "[::1]:65535", "m.local:1"]
                ),
            },
        ),
        "route": st.lists(valid_route, max_size=3),
    }
)
ALL_KEYS = [(section, key) for section, keys in SECTIONS.items() for key in keys]
mutations = st.lists(
    st.tuples(
        st.sampled_from(
            [
                *ALL_KEYS,
                ("api", "colour"),
                ("route", "glob"),
                ("route", "group"),
                ("route", "batch_window_seconds"),
                ("route", "colour"),
            ]
        ),
        anything,
    ),
    max_size=2,
)


@given(base=valid_documents, changes=mutations, environ=environments)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_valid_config_with_any_key_changed_runs_or_names_that_key(
    base: dict[str, Any], changes: list[tuple[tuple[str, str], object]], environ: dict[str, str]
) -> None:
    """Starting from a configuration that must load, change up to two keys to anything: the
    result loads and runs, or the error names one of the changed keys (or variables)."""
    document = copy.deepcopy(base)
    changed = set(environ)
    for (section, key), value in changes:
        if section == "route":
            if not document["route"]:
                continue
            document["route"][0][key] = value
            changed.add(f"route.0.{key}" if key != "colour" else "route.0")
        else:
            document[section][key] = value
            changed.add(f"{section}.{key}")
    outcome = load(toml_document(document), environ)
    if isinstance(outcome, ConfigError):
        event("config error")
        assert changed, f"a valid configuration was refused: {outcome.message}"
        assert any(name in outcome.message for name in changed), (changed, outcome.message)
    else:
        event("loaded")
        assert_usable(outcome)


def assert_usable(config: Config) -> None:
    """Build what the runner builds from a configuration; nothing may raise or wait forever."""
    clock = FakeClock()
    limiter = RateLimiter(**limits_for(config), clock=clock)
    limiter.reconfigure(**limits_for(config))
    limits = config.limits
    assert max(limits.burst, limits.max_concurrency, limits.max_open_calls) < SQLITE_MAX
    assert 0 < 1 / limits.requests_per_second < math.inf

    rng = random.Random(0)
    poll = config.poll
    for attempt in (0, 1, 7, 60, 10**6):
        delay = poll_delay(attempt, initial=poll.initial_seconds, maximum=poll.max_seconds, rng=rng)
        assert 0 < delay <= poll.max_seconds
        retry = retry_delay(attempt, base=poll.initial_seconds, maximum=poll.max_seconds, rng=rng)
        assert 0 <= retry <= poll.max_seconds
    assert poll.calls_per_request >= 1

    seconds = [
        config.api.timeout_seconds,
        config.api.visibility_window,
        config.api.unreachable_timeout,
        config.inbox.settle_seconds,
        config.inbox.rescan_seconds,
        poll.give_up_after,
        config.service.graceful_timeout,
        *(route.batch_window_seconds for route in config.routes),
    ]
    for value in seconds:
        assert type(value) is float or type(value) is int
        assert 0 <= value <= 366 * 86_400
        assert math.isfinite(clock.wall() + value)
        assert parse_duration(value) == value
    httpx.Timeout(config.api.timeout_seconds)

    url = httpx.URL(config.api.base_url)
    assert url.scheme in ("http", "https")
    assert url.host
    httpx.URL(config.api.base_url + "/v3/calls")
    if config.service.metrics_addr is not None:
        parse_address(config.service.metrics_addr)
    if config.api_key is not None:
        key = config.api_key.get_secret_value()
        assert key
        assert all(0x21 <= ord(char) <= 0x7E for char in key)
        httpx.Headers({"Authorization": f"Bearer {key}"})

    for path in (config.paths.inbox, config.paths.outbox, config.paths.archive, config.paths.state):
        assert path.is_absolute()
        assert ".." not in path.parts
    for rel in SAMPLE_FILES:
        destination = route_file(PurePosixPath(rel), config.routes)
        if destination is not None and config.routes:
            assert workflow_name_problem(destination.workflow) is None
    for route in config.routes:
        assert 1 <= route.batch_max_files < SQLITE_MAX
        assert 1 <= route.batch_max_bytes < SQLITE_MAX
    assert config.routes is config.routes
