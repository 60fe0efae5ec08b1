"""``bem-runner webhook setup``: the signing secret and the subscriptions the receiver needs.

Idempotent: the secret is created only when bem has none (else bem's active one is kept, and
written to the file if the file does not hold it), a subscription only when no subscription of
that function, type and URL exists (a disabled one is enabled). The secret is written to its file
with mode 0600 and printed nowhere.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import httpx

from runner.config import Config, load_config
from runner.errors import RunnerError

EVENT_TYPES = ("transform", "error")
PAGE = 100
TIMEOUT_SECONDS = 30.0


class SetupError(RunnerError):
    """bem refused a setup request, or the secret file cannot be written."""


@click.group("webhook")
def webhook_group() -> None:
    """Set up bem's webhooks for the receiver ([webhook] in the config)."""


@webhook_group.command("setup")
@click.option("--url", required=True, help="The public URL bem delivers to (https://…/path).")
@click.option(
    "--function",
    "functions",
    multiple=True,
    help="A function whose transform and error events to receive (repeatable); for a "
    "workflow, its final function(s).",
)
@click.option(
    "--secret-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the signing secret goes (default: webhook.secret_file).",
)
@click.pass_context
def setup_command(
    ctx: click.Context, url: str, functions: tuple[str, ...], secret_file: Path | None
) -> None:
    """Create the signing secret if none exists, and the subscriptions to URL."""
    obj = ctx.find_root().obj
    try:
        config = load_config(
            obj["config_path"], environ=obj["environ"], webhook_secrets_needed=False
        )
        path = secret_file or config.webhook.secret_file
        if path is None:
            raise SetupError("give --secret-file or set webhook.secret_file")
        with _client(config) as http:
            click.echo(ensure_secret(http, path))
            for function in functions:
                for kind in EVENT_TYPES:
                    click.echo(ensure_subscription(http, function=function, kind=kind, url=url))
    except RunnerError as exc:
        raise click.ClickException(str(exc)) from exc
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach bem: {exc}") from exc
    if not functions:
        click.echo("no --function given: no subscriptions created", err=True)


def ensure_secret(http: httpx.Client, path: Path) -> str:
    """What was done about the signing secret, in words that never contain it."""
    response = http.get("/v3/webhook-secret")
    if response.status_code == 404:
        secret = _secret_of(_checked(http.post("/v3/webhook-secret")))
        write_secret(path, secret)
        return f"signing secret: created, written to {path}"
    secret = _secret_of(_checked(response))
    if _file_holds(path, secret):
        return f"signing secret: exists, {path} holds it"
    write_secret(path, secret)
    return f"signing secret: exists, written to {path}"


def ensure_subscription(http: httpx.Client, *, function: str, kind: str, url: str) -> str:
    for subscription in _subscriptions(http, function):
        if subscription.get("type") != kind or subscription.get("webhookURL") != url:
            continue
        sid = subscription["subscriptionID"]
        if subscription.get("disabled"):
            _checked(http.patch(f"/v3/subscriptions/{sid}", json={"disabled": False}))
            return f"subscription {kind} of {function} → {url}: enabled ({sid})"
        return f"subscription {kind} of {function} → {url}: exists ({sid})"
    body = {
        "name": f"bem-runner {function} {kind}",
        "type": kind,
        "functionName": function,
        "webhookURL": url,
    }
    created = _checked(http.post("/v3/subscriptions", json=body)).json()
    return f"subscription {kind} of {function} → {url}: created ({created['subscriptionID']})"


def write_secret(path: Path, secret: str) -> None:
    """Atomically, mode 0600 from the start (never readable by others, even for a moment)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secret.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        raise SetupError(f"cannot write the secret to {path}: {exc.strerror}") from exc


def _file_holds(path: Path, secret: str) -> bool:
    try:
        return path.read_text(encoding="ascii").strip() == secret
    except (OSError, UnicodeDecodeError):
        return False


def _subscriptions(http: httpx.Client, function: str) -> Iterator[dict[str, Any]]:
    after: str | None = None
    while True:
        params: dict[str, str | int] = {"functionNames": function, "limit": PAGE}
        if after is not None:
            params["startingAfter"] = after
        page: Sequence[dict[str, Any]] = _checked(
            http.get("/v3/subscriptions", params=params)
        ).json()
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1]["subscriptionID"]


def _client(config: Config) -> httpx.Client:
    if config.api_key is None:
        raise SetupError("no API key: set BEM_API_KEY or api.api_key_file")
    return httpx.Client(
        base_url=config.api.base_url,
        headers={"x-api-key": config.api_key.get_secret_value()},
        timeout=TIMEOUT_SECONDS,
    )


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        message = str(response.json().get("error", ""))
    except ValueError:
        message = ""
    where = f"{response.request.method} {response.request.url.path}"
    raise SetupError(f"{where}: bem answered {response.status_code} {message}".rstrip())


def _secret_of(response: httpx.Response) -> str:
    secret = response.json().get("secret")
    if not isinstance(secret, str) or not secret:
        raise SetupError("bem answered without a signing secret")
    return secret
