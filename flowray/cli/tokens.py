"""Token commands: flowray token create / list / revoke."""

from __future__ import annotations

import os
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table

from flowray.cli.common import (
    DataDir,
    app,
    console,
    err,
    fail,
)
from flowray.config import DEFAULT_DATA_DIR, Settings


class Scope(StrEnum):
    """Token scopes as typer choices: flowray.api.auth.SCOPES (tests/test_cli_habits.py checks)."""

    ingest = "ingest"
    read = "read"
    admin = "admin"


token_app = typer.Typer(
    help="Scoped access tokens, kept hashed in DATA_DIR/tokens.sqlite (no cluster needed).",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    scope: Annotated[Scope, typer.Option(help="What the token may do.")],
    site: Annotated[
        list[str] | None,
        typer.Option(help="A site the token covers; repeat for more. Needed unless admin."),
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Requests/s allowed per API process (bursts of 2 s).")
    ] = None,
    name: Annotated[str, typer.Option(help="A note saying who or what uses it.")] = "",
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
) -> None:
    """Create a token and print it once (only its hash is kept), with its id."""
    from flowray.api.auth import StoreUnavailable, TokenStore

    settings = Settings.from_env(data_dir=data_dir)
    store = TokenStore(settings.tokens_file)
    try:
        was_open = not store.active() and not os.environ.get("FLOWRAY_ADMIN_TOKEN")
        token, record = store.create(scope.value, site or [], rate, name)
    except (ValueError, StoreUnavailable) as exc:
        fail(str(exc))
        return
    sites = ", ".join(sorted(record.sites)) or "every site"
    limit = f", {record.rate_per_s:g} requests/s" if record.rate_per_s else ""
    err.print(f"created token {record.id} ({record.scope} for {sites}{limit}); it is shown once:")
    typer.echo(token)
    if was_open and settings.auth == "auto":
        err.print(
            "[yellow]note:[/yellow] this cluster's API now demands tokens (auth=auto) on every "
            "route but /healthz, /metrics, /docs and / within 2 s"
        )


@token_app.command("list")
def token_list(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List tokens (ids, scopes, sites; never the tokens themselves)."""
    from flowray.api.auth import StoreUnavailable, TokenStore

    try:
        records = TokenStore(Settings.from_env(data_dir=data_dir).tokens_file).records()
    except StoreUnavailable as exc:
        fail(str(exc))
        return
    if as_json:
        sys.stdout.write(orjson.dumps([r.public() for r in records]).decode() + "\n")
        return
    table = Table(title=f"flowray tokens in {data_dir}")
    for col in ("id", "scope", "sites", "rate/s", "name", "created", "state"):
        table.add_column(col)
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r.created_ms / 1000))
        table.add_row(
            r.id,
            r.scope,
            ", ".join(sorted(r.sites)) or "*",
            f"{r.rate_per_s:g}" if r.rate_per_s else "-",
            r.name,
            created,
            "revoked" if r.revoked else "active",
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The id 'token list' shows.")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
) -> None:
    """Revoke a token: every API process refuses it within a few seconds."""
    from flowray.api.auth import StoreUnavailable, TokenStore

    try:
        record = TokenStore(Settings.from_env(data_dir=data_dir).tokens_file).revoke(token_id)
    except StoreUnavailable as exc:
        fail(str(exc))
        return
    if record is None:
        fail(f"no token with id {token_id!r} in {data_dir} (see 'flowray token list')")
        return
    console.print(f"token {record.id} ({record.scope}, {record.name or 'no name'}) is revoked")
