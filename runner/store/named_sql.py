"""Named SQL: a ``.sql`` file beside the stores, one statement (or script) per ``-- name:``."""

from __future__ import annotations

from importlib import resources


def load_queries(filename: str) -> dict[str, str]:
    """The statements of ``runner/store/<filename>`` by name; other ``--`` lines are comments."""
    text = resources.files("runner.store").joinpath(filename).read_text(encoding="utf-8")
    queries: dict[str, str] = {}
    name: str | None = None
    for line in text.splitlines():
        if line.startswith("-- name: "):
            name = line.removeprefix("-- name: ").strip()
            queries[name] = ""
        elif name is not None and not line.startswith("--"):
            queries[name] += line + "\n"
    return {key: value.strip() for key, value in queries.items()}


def statements(script: str) -> list[str]:
    """The statements of a script, one per ``;`` that ends a line."""
    return [statement for statement in script.split(";\n") if statement.strip()]
