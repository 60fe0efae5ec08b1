"""``bem-runner store migrate``: a SQLite state moved into a PostgreSQL store."""

from __future__ import annotations

from pathlib import Path

import anyio
import click

from runner.config import load_config
from runner.daemon import ExitCode
from runner.errors import RunnerError
from runner.store import is_postgres_url


@click.group("store")
def store_group() -> None:
    """Manage the store (migrate a SQLite state into PostgreSQL)."""


@store_group.command("migrate")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(path_type=Path),
    help="The SQLite state file to copy (opened read-only, never changed).",
)
@click.option(
    "--store",
    "store_url",
    default=None,
    metavar="URL",
    help="The empty postgresql:// store to copy it into (default: store.url or "
    "BEM_RUNNER_STORE_URL).",
)
@click.pass_context
def migrate_command(ctx: click.Context, source: Path, store_url: str | None) -> None:
    """Copy a SQLite state into an empty PostgreSQL store, in one transaction.

    Open calls keep their callIDs and callReferenceIDs, files their exact names; webhook events
    and content-dedupe facts come along. Exit 2, naming why, when the store is not empty, the
    state is missing, not a state file, or in use by a runner.
    """
    obj = ctx.find_root().obj
    try:
        config = load_config(
            obj["config_path"],
            environ=obj["environ"],
            overrides={"store.url": store_url},
            webhook_secrets_needed=False,
        )
        url = config.store_target
        if not is_postgres_url(url):
            raise RunnerError(
                "no PostgreSQL store to migrate into: give --store URL or set store.url"
            )
        try:
            from runner.store.transfer import migrate_state  # psycopg only when used
        except ImportError as exc:
            raise RunnerError(
                f"a PostgreSQL store needs psycopg ({exc.name} is missing): "
                "pip install 'bem-runner[postgres]'"
            ) from None
        copied = anyio.run(lambda: migrate_state(source, str(url), environ=obj["environ"]))
    except RunnerError as exc:
        click.echo(f"bem-runner: {exc}", err=True)
        ctx.exit(ExitCode.USAGE)
    click.echo(f"migrated {source} into {copied.into}")
    click.echo(copied.summary())
    click.echo(f"{source} is unchanged: retire it, so that no runner works on it again")
