"""What every command shares: the Typer app, the consoles, options, and the ways to
reach a running cluster."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flowray.client import ApiError, Client, ClusterNotFound, find_url

app = typer.Typer(
    help="flowray: minute-by-minute web traffic analytics on Ray.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="FLOWRAY_DATA_DIR", help="Where the cluster keeps its data."),
]
Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="FLOWRAY_URL",
        help="API URL of a running cluster (default: the one recorded in --data-dir).",
    ),
]
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
        except (ApiError, OSError) as exc:
            fail(str(exc))
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
