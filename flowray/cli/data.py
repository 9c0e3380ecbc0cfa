"""Data commands: ingest, process, query, demo."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flowray.cli.common import (
    BAD_LINES_SHOWN_MAX,
    DataDir,
    Url,
    app,
    client_for,
    console,
    err,
    fail,
)
from flowray.client import ApiError
from flowray.config import DEFAULT_DATA_DIR


def _event_dicts(table: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


@app.command()
def ingest(
    files: Annotated[list[Path], typer.Argument(help="Log files (plain or .gz).")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    format: Annotated[str, typer.Option(help="auto, seed, combined or ndjson.")] = "auto",
    site: Annotated[
        str | None, typer.Option(help="Site of every event (needed for combined logs).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Events per request.")] = 5000,
) -> None:
    """Stream events from files to the API, with a progress bar; bad lines are reported."""
    from flowray.ingest import events as ev

    if format not in ev.FORMATS:
        fail(f"--format must be one of {', '.join(ev.FORMATS)}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    accepted, bad_total = 0, 0
    with (
        client_for(data_dir, url, ingest=True) as client,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as progress,
    ):
        for path in files:
            task = progress.add_task(path.name, total=path.stat().st_size)
            limits = ev.Limits(now_ms=int(time.time() * 1000))
            try:
                chunks = ev.iter_file(path, format, limits, site=site, chunk_lines=batch)
                for chunk in chunks:
                    for item in chunk.bad:
                        bad_total += 1
                        if bad_total <= BAD_LINES_SHOWN_MAX:
                            progress.console.print(f"{path}:{item.position}: {item.reason}")
                    if chunk.events.num_rows:
                        accepted += client.send_events(_event_dicts(chunk.events))
                    progress.update(task, advance=chunk.bytes)
            except (ValueError, ApiError, OSError) as exc:
                fail(f"{path}: {exc}")
    if bad_total > BAD_LINES_SHOWN_MAX:
        err.print(f"... and {bad_total - BAD_LINES_SHOWN_MAX} more bad lines")
    console.print(f"accepted {accepted} events; {bad_total} bad lines skipped")


@app.command()
def process(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    all_blocks: Annotated[
        bool, typer.Option("--all", help="Also seal blocks of hours that are still open.")
    ] = False,
) -> None:
    """Seal and process every block that is due now (normally automatic)."""
    with client_for(data_dir, url, admin=True) as client, err.status("processing ..."):
        try:
            result = client.process("all" if all_blocks else "closed")
        except (ApiError, OSError) as exc:
            fail(str(exc))
            return
    console.print(
        f"processed {result['blocks']} blocks into {result['units']} units "
        f"({result['events']} events) in {result['seconds']} s; "
        f"generation {result['generation']}"
    )


@app.command()
def query(
    site: Annotated[str, typer.Argument(help="The site, e.g. example.com")],
    start: Annotated[str, typer.Option(help="Inclusive start (ISO-8601, date, epoch ms).")],
    end: Annotated[str, typer.Option(help="Exclusive end (ISO-8601, date, epoch ms).")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    interval: Annotated[str, typer.Option(help="minute, hour or day.")] = "minute",
    tz: Annotated[str, typer.Option(help="IANA time zone.")] = "UTC",
    format: Annotated[str, typer.Option(help="table, json or csv.")] = "table",
) -> None:
    """A site's traffic series."""
    if format not in ("table", "json", "csv"):
        fail("--format must be one of table, json, csv")
    params = {"start": start, "end": end, "interval": interval, "tz": tz}
    with client_for(data_dir, url) as client:
        try:
            if format == "csv":
                sys.stdout.write(client.traffic_text(site, format="csv", **params))
                return
            body = client.traffic(site, **params)
        except (ApiError, OSError) as exc:
            fail(str(exc))
            return
    if format == "json":
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"{body['site']} per {interval} ({tz})")
    table.add_column("t")
    table.add_column("count", justify="right")
    table.add_column("provisional")
    for p in body["points"]:
        table.add_row(p["t"], str(p["count"]), "yes" if p["provisional"] else "")
    console.print(table)
    total = sum(p["count"] for p in body["points"])
    console.print(f"total {total}; final up to {body['watermark']}")


@app.command()
def demo(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    sites: Annotated[int, typer.Option(help="Demo sites (demo-N.example).")] = 20,
    hours: Annotated[int, typer.Option(help="Hours of traffic, ending now.")] = 6,
    events: Annotated[int, typer.Option(help="Events in all.")] = 50_000,
    seed: Annotated[
        int,
        typer.Option(help="Random seed: the same seed sends the same events, which count once."),
    ] = 1,
) -> None:
    """Send made-up traffic for a few demo sites, then show how to query it."""
    import random

    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - hours * 3_600_000
    names = [f"demo-{i}.example" for i in range(sites)]
    weights = [1.0 / (1 + i) for i in range(sites)]
    sent = 0
    with (
        client_for(data_dir, url, ingest=True) as client,
        Progress(
            TextColumn("demo traffic"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            console=err,
        ) as progress,
    ):
        task = progress.add_task("demo", total=events)
        while sent < events:
            n = min(5000, events - sent)
            batch = [
                {
                    "ts": rng.randrange(start_ms, now_ms),
                    "site": rng.choices(names, weights)[0],
                    "path": f"/page/{rng.randrange(50)}",
                    "id": f"demo-{seed}-{sent + i}",
                }
                for i in range(n)
            ]
            try:
                client.send_events(batch)
            except (ApiError, OSError) as exc:
                fail(str(exc))
            sent += n
            progress.update(task, completed=sent)
    console.print(f"sent {sent} events for {sites} sites over the last {hours} hours. Try:")
    console.print(
        f"  flowray process --all && flowray query {names[0]} "
        f"--start {time.strftime('%Y-%m-%dT%H:00:00Z', time.gmtime(start_ms / 1000))} "
        f"--end {time.strftime('%Y-%m-%dT%H:%M:00Z', time.gmtime(now_ms / 1000 + 60))}"
        " --interval hour"
    )
