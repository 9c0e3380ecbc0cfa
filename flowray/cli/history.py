"""History commands: reprocess, rollback, versions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from flowray.cli.common import (
    CALL_ERRORS,
    CHANGES_SHOWN,
    DataDir,
    Url,
    app,
    ask,
    client_for,
    console,
    fail,
    follow_job,
    print_changes,
    versions_table,
)
from flowray.config import DEFAULT_DATA_DIR


@app.command()
def reprocess(
    start: Annotated[str, typer.Option(help="Inclusive start (ISO-8601, date, epoch ms).")],
    end: Annotated[str, typer.Option(help="Exclusive end (ISO-8601, date, epoch ms).")],
    site: Annotated[
        list[str] | None, typer.Option("--site", help="Only this site (repeatable).")
    ] = None,
    logic: Annotated[
        str | None, typer.Option(help="Processing logic (default: the current version's).")
    ] = None,
    logic_module: Annotated[
        list[str] | None,
        typer.Option(
            "--logic-module",
            help="Module that registers the logic (repeatable); must be importable by the "
            "cluster's processes.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; publish nothing.")
    ] = False,
    tz: Annotated[str, typer.Option(help="Time zone of --start/--end without one.")] = "UTC",
    as_json: Annotated[bool, typer.Option("--json", help="The full result as JSON.")] = False,
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
) -> None:
    """Re-process published hours from the retained raw log, show what changes, and
    publish the result as a new warehouse version (atomically)."""
    request = {
        "start": start,
        "end": end,
        "tz": tz,
        "sites": site or None,
        "logic": logic,
        "logic_modules": logic_module or [],
        "dry_run": dry_run,
    }
    with client_for(data_dir, url, admin=True) as client:
        try:
            result = follow_job(client, client.reprocess(**request), "re-processing")
        except CALL_ERRORS as exc:
            fail(str(exc))
            return
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    print_changes(result, CHANGES_SHOWN)
    if result["dry_run"]:
        console.print(f"dry run: nothing published; version {result['from_version']} stays")
    else:
        console.print(
            f"published version {result['version']} (logic {result['logic']}), "
            f"replacing version {result['from_version']}; 'flowray rollback' returns to it"
        )


@app.command()
def rollback(
    to: Annotated[
        int | None, typer.Option("--to", help="Version to return to (default: the previous).")
    ] = None,
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
) -> None:
    """Return the warehouse to the previous version (hours processed since are re-made
    with that version's logic)."""
    with client_for(data_dir, url, admin=True) as client:
        try:
            result = follow_job(client, client.rollback(to), "rolling back")
        except CALL_ERRORS as exc:
            fail(str(exc))
            return
    console.print(
        f"version {result['version']} (logic {result['logic']}) is current again, "
        f"replacing version {result['from_version']}; "
        f"{result['units_brought_up_to_date']} units brought up to date"
    )


@app.command()
def versions(
    as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False,
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
) -> None:
    """The warehouse versions: logic, parent, units, events, which one is current."""
    rows = ask(data_dir, url, lambda c: c.versions())
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    console.print(versions_table(rows))
