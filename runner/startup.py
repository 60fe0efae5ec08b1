"""What a runner works out once as it starts: its folders, its name on a shared store, limits."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import msgspec.structs
import structlog

from runner.config import Config
from runner.errors import ConfigError
from runner.store import this_runner_id

log = structlog.get_logger("runner.startup")

RESTART_SECTIONS = ("paths", "api", "service", "store")
"""Sections a reload cannot change in a running process: they are read once, as it starts."""

RATE_HEADROOM = 0.97
"""Run a little under the account's limit and keep one token of bem's bucket unspent: the margin
absorbs network jitter, where running exactly at the limit turns every early arrival into a 429."""


def runner_id_for(config: Config) -> str:
    """``store.runner_id``, else hostname-pid: unique among the runners of one store."""
    return this_runner_id(config.store.runner_id)


def make_directory(key: str, path: Path) -> None:
    """Create a configured folder; one that cannot be a folder is a :class:`ConfigError`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise ConfigError(f"{key}: {path} exists and is not a folder") from exc
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create {path}: {exc.strerror}") from exc
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} exists and is not a folder")


class Limits(TypedDict):
    rate: float
    burst: int
    max_concurrency: int


def limits_for(config: Config) -> Limits:
    limits = config.limits
    return {
        "rate": limits.requests_per_second * RATE_HEADROOM,
        "burst": max(1, limits.burst - 1),
        "max_concurrency": limits.max_concurrency,
    }


def reloadable(current: Config, fresh: Config) -> Config:
    """A re-read configuration as a running runner applies it: limits and routes now; paths,
    API, service and store kept as they are (changes to them are logged, for the next start).

    A :class:`ConfigError` when the new sections do not go with the kept ones (archiving into
    a running inbox).
    """
    kept = {}
    for section in RESTART_SECTIONS:
        if getattr(fresh, section) != getattr(current, section):
            log.warning("reload: changes to this section need a restart", section=section)
        kept[section] = getattr(current, section)
    try:
        return msgspec.structs.replace(
            fresh, **kept, api_key=current.api_key, store_url=current.store_url
        )
    except ValueError as exc:
        raise ConfigError(f"invalid configuration with the running paths:\n  {exc}") from exc
