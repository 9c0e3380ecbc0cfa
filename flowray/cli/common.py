"""What every command shares: the Typer app, the consoles, options, and the ways to
reach a running cluster."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flowray import __version__
from flowray.client import ApiError, Client, ClusterNotFound, find_url

app = typer.Typer(
    help="flowray: minute-by-minute web traffic analytics on Ray.",
    no_args_is_help=True,
    # --install-completion / --show-completion: typer's completion for bash, zsh, fish
    # and PowerShell, which also completes the choices of the options below.
    add_completion=True,
)
console = Console()
err = Console(stderr=True)


# Choices as enums, so typer refuses any other value at once and lists the choices (and
# shell completion offers them). Written out rather than built from the server's tuples,
# so that starting the CLI (and every completion) loads neither numpy nor pyarrow;
# tests/test_cli_habits.py checks them against flowray.query.series.INTERVALS and
# flowray.ingest.events.FORMATS.
class Interval(StrEnum):
    minute = "minute"
    hour = "hour"
    day = "day"
    week = "week"
    month = "month"


class IngestFormat(StrEnum):
    auto = "auto"
    seed = "seed"
    combined = "combined"
    ndjson = "ndjson"


@dataclass
class GlobalOptions:
    """--data-dir and --url given before the command (None: not given there); kept in
    typer's context so that every command can fall back on them."""

    data_dir: Path | None = None
    url: str | None = None


def _prefer_global(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    """A command's own --data-dir/--url, given after the command, wins; otherwise one
    given before the command; otherwise the environment variable or the default."""
    name = param.name or ""
    source = ctx.get_parameter_source(name)
    # By name: typer may bring its own copy of click, with its own ParameterSource.
    if source is not None and source.name == "COMMANDLINE":
        return value
    given = getattr(ctx.find_object(GlobalOptions), name, None)
    return value if given is None else given


DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="FLOWRAY_DATA_DIR",
        help="Where the cluster keeps its data.",
        callback=_prefer_global,
    ),
]
Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="FLOWRAY_URL",
        help="API URL of a running cluster (default: the one recorded in --data-dir).",
        callback=_prefer_global,
    ),
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"flowray {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where the cluster keeps its data, for every command (FLOWRAY_DATA_DIR; "
            "default ./flowray-data). Also accepted after the command, where it wins.",
            show_default=False,
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="API URL of a running cluster, for every command (FLOWRAY_URL; default: "
            "the one recorded in --data-dir). Also accepted after the command.",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print flowray's version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """flowray: minute-by-minute web traffic analytics on Ray."""
    # No envvar here: the commands' own options read FLOWRAY_DATA_DIR and FLOWRAY_URL,
    # so a value in this context was typed before the command and beats them.
    ctx.obj = GlobalOptions(data_dir=data_dir, url=url)


# What a call to the cluster may raise that ends a command with a message, not a
# traceback: httpx's errors (a refused connection to a stale --url) are no OSError.
CALL_ERRORS = (ApiError, OSError, TimeoutError, httpx.HTTPError)
UP_TIMEOUT_S = 180.0
DOWN_TIMEOUT_S = 60.0
BAD_LINES_SHOWN_MAX = 20


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def client_for(
    data_dir: Path, url: str | None, ingest: bool = False, admin: bool = False
) -> Client:
    """A client for the cluster, with FLOWRAY_TOKEN, or for admin calls the admin token."""
    tokens = [os.environ.get("FLOWRAY_TOKEN"), os.environ.get("FLOWRAY_ADMIN_TOKEN")]
    if admin:
        tokens.reverse()
    try:
        if ingest and not url:
            url = find_url(data_dir, None, key="ingest_url")
        return Client(find_url(data_dir, url), token=next((t for t in tokens if t), None))
    except ClusterNotFound as exc:
        fail(str(exc))
        raise  # unreachable; for the type checker


def ask(data_dir: Path, url: str | None, call: Callable[[Client], Any]) -> Any:
    """``call`` on an admin client of the running cluster; a failure ends the command."""
    with client_for(data_dir, url, admin=True) as client:
        try:
            return call(client)
        except CALL_ERRORS as exc:
            fail(str(exc) or type(exc).__name__)
            return None


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def session_pids(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (Linux /proc; empty elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def read_record(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / "cluster.json"
    if not path.exists():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record


JOB_TIMEOUT_S = 24 * 3600.0
CHANGES_SHOWN = 20


def follow_job(client: Client, job: dict[str, Any], label: str) -> dict[str, Any]:
    """Wait for a processor job with a progress bar over the units it re-makes."""
    with Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} units"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def show(state: dict[str, Any]) -> None:
            bar.update(task, total=state.get("total"), completed=state.get("done", 0))

        state = client.wait_job(job, JOB_TIMEOUT_S, show)
    result: dict[str, Any] = state["result"]
    return result


def print_changes(result: dict[str, Any], shown: int) -> None:
    changes = result["changes"]
    if changes:
        table = Table(title=f"sites changed: {result['sites_changed']}")
        table.add_column("site")
        table.add_column("buckets changed", justify="right")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for row in changes[:shown]:
            table.add_row(
                row["site"], str(row["buckets_changed"]), str(row["before"]), str(row["after"])
            )
        console.print(table)
        if len(changes) > shown:
            console.print(f"... and {result['sites_changed'] - shown} more sites (see --json)")
    console.print(
        f"{result['units']} units; {result['sites_examined']} sites examined, "
        f"{result['sites_changed']} changed, {result['buckets_changed']} buckets changed; "
        f"events {result['events_before']} -> {result['events_after']}"
    )


def versions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="warehouse versions")
    for name in ("version", "current", "logic", "parent", "created", "units", "events", "note"):
        table.add_column(name, justify="right" if name in ("units", "events") else "left")
    for v in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["created_ms"] / 1000))
        table.add_row(
            str(v["version"]),
            "*" if v["current"] else "",
            v["logic"],
            "" if v["parent"] is None else str(v["parent"]),
            created,
            str(v["units"]),
            str(v["events"]),
            v["note"],
        )
    return table
