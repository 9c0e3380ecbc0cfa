"""README.md documents every CLI command and every HTTP route."""

from __future__ import annotations

from pathlib import Path

import typer.main

from flowray.cli import app as cli_app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_cli_command_is_documented() -> None:
    group = typer.main.get_command(cli_app)
    names = sorted(group.commands)  # type: ignore[attr-defined]
    assert {"up", "down", "status", "ingest", "process", "query"} <= set(names)
    missing = [n for n in names if f"`flowray {n}" not in README]
    assert not missing, f"README.md does not document: {missing}"


def test_every_http_route_is_documented() -> None:
    routes = _routes()
    assert "/v1/events" in routes and "/v1/sites/{site}/traffic" in routes
    missing = [r for r in routes if f"{r}`" not in README and f"{r}?" not in README]
    assert not missing, f"README.md does not document: {missing}"


def _routes() -> list[str]:
    """The app's own routes (FastAPI's /docs helpers aside), from the app itself."""
    from fastapi.routing import APIRoute

    from flowray.api.app import create_app
    from flowray.config import Settings
    from flowray.core.router import ShardMap
    from flowray.query.cache import MemoryCache

    app = create_app(
        settings=Settings(),
        shard_map=ShardMap.round_robin(1, 1),
        ingest=None,  # type: ignore[arg-type]
        warehouse=None,
        admin=None,
        cache=MemoryCache(),  # type: ignore[arg-type]
    )
    return [r.path for r in app.routes if isinstance(r, APIRoute)] + ["/docs"]


def test_readme_starts_with_the_two_commands() -> None:
    head = README.split("## ")[0]
    assert "scripts/up" in head and "scripts/test" in head
    assert "scripts/test" in (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
