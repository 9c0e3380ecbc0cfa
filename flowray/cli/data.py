"""Data commands: ingest, process, query, demo."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from flowray.cli.common import (
    BAD_LINES_SHOWN_MAX,
    CALL_ERRORS,
    DataDir,
    IngestFormat,
    Interval,
    Url,
    app,
    client_for,
    console,
    err,
    fail,
)
from flowray.config import DEFAULT_DATA_DIR


def _event_dicts(table: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


@app.command()
def ingest(
    files: Annotated[list[Path], typer.Argument(help="Log files (plain or .gz).")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    format: Annotated[
        IngestFormat, typer.Option(help="The files' form (auto: told by their first lines).")
    ] = IngestFormat.auto,
    site: Annotated[
        str | None, typer.Option(help="Site of every event (needed for combined logs).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Events per request.")] = 5000,
) -> None:
    """Stream events from files to the API, with a progress bar; bad lines are reported."""
    from flowray.ingest import events as ev
    from flowray.storage.salts import ImportSalts

    # One import, one secret: its visitor ids link within this import and a day only.
    salts = ImportSalts(None)
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
                chunks = ev.iter_file(
                    path,
                    format.value,
                    limits,
                    site=site,
                    chunk_lines=batch,
                    salt_of_day=salts.salt_for,
                )
                for chunk in chunks:
                    for item in chunk.bad:
                        bad_total += 1
                        if bad_total <= BAD_LINES_SHOWN_MAX:
                            progress.console.print(f"{path}:{item.position}: {item.reason}")
                    if chunk.events.num_rows:
                        accepted += client.send_events(_event_dicts(chunk.events))
                    progress.update(task, advance=chunk.bytes)
            except (ValueError, *CALL_ERRORS) as exc:
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
        except CALL_ERRORS as exc:
            fail(str(exc))
            return
    console.print(
        f"processed {result['blocks']} blocks into {result['units']} units "
        f"({result['events']} events) in {result['seconds']} s; "
        f"generation {result['generation']}"
    )


class QueryFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


# The insight choices, written out so that the CLI starts without pyarrow;
# tests/test_cli_insights.py checks them against flowray.query.insights.
class Dimension(StrEnum):
    path = "path"
    source = "source"
    utm_medium = "utm_medium"
    utm_campaign = "utm_campaign"
    browser = "browser"
    os = "os"
    device = "device"
    name = "name"


QUERY_METRICS = ("visitors", "pageviews", "events")
FILTER_OPS = ("is", "is_not", "contains")
FILTERS_MAX = 16

MetricsOption = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        help=f"Comma-separated metrics of {', '.join(QUERY_METRICS)} (default: all three).",
        show_default=False,
    ),
]
ByOption = Annotated[
    Dimension | None,
    typer.Option("--by", help="A breakdown table: the metrics per value of this dimension."),
]
FilterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--filter",
        help="Keep events whose DIM:OP:VALUE holds, OP one of is, is_not, contains; "
        "VALUE may list values as A|B. Repeatable (all must hold).",
        show_default=False,
    ),
]
CompareOption = Annotated[
    bool, typer.Option("--compare", help="The range's totals beside the previous period's.")
]


@app.command()
def query(
    site: Annotated[str, typer.Argument(help="The site, e.g. example.com")],
    start: Annotated[
        str | None,
        typer.Option(
            help="Inclusive start (RFC 3339, date, epoch ms). Default: 24 h before --end.",
            show_default=False,
        ),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option(
            help="Exclusive end (RFC 3339, date, epoch ms). Default: 24 h after --start, "
            "or the end of the current minute when neither is given.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    interval: Annotated[Interval, typer.Option(help="Bucket size.")] = Interval.minute,
    tz: Annotated[str, typer.Option(help="IANA time zone.")] = "UTC",
    format: Annotated[QueryFormat, typer.Option(help="How to print it.")] = QueryFormat.table,
    all_rows: Annotated[
        bool,
        typer.Option(
            "--all", help="Print every row of the table (default: a long one's first and last)."
        ),
    ] = False,
    metrics: MetricsOption = None,
    by: ByOption = None,
    filters: FilterOption = None,
    compare: CompareOption = False,
) -> None:
    """A site's traffic series, as a sparkline and a table (or JSON, or CSV).

    Without --start and --end: the last 24 hours. With --metrics or --filter: visitors,
    pageviews and events per bucket; with --by: a breakdown; with --compare: totals
    beside the previous period's."""
    want = InsightOptions.of(metrics, by, filters or [], compare)
    try:
        start, end = query_range(start, end, tz, int(time.time() * 1000))
    except ValueError as exc:  # series.RangeError: a bad time or zone
        fail(str(exc))
        return
    if want is not None:
        params = {"start": start, "end": end, "tz": tz, "interval": interval.value}
        insight_query(site, want, params, client_for(data_dir, url), format, all_rows)
        return
    params = {"start": start, "end": end, "interval": interval.value, "tz": tz}
    with client_for(data_dir, url) as client:
        try:
            if format is QueryFormat.csv:
                sys.stdout.write(client.traffic_text(site, format="csv", **params))
                return
            body = client.traffic(site, **params)
        except CALL_ERRORS as exc:
            fail(str(exc))
            return
    if format is QueryFormat.json:
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    print_series(console, body, interval.value, tz, all_rows)


@dataclass(frozen=True)
class InsightOptions:
    """The insight flags of ``flowray query``, checked before any call to a cluster."""

    metrics: tuple[str, ...]
    by: str | None
    filters: tuple[str, ...]
    compare: bool

    @classmethod
    def of(
        cls, metrics: str | None, by: Dimension | None, filters: list[str], compare: bool
    ) -> InsightOptions | None:
        """The options, or None when no insight flag is given (the plain series)."""
        if metrics is None and by is None and not filters and not compare:
            return None
        names = tuple(m.strip() for m in (metrics or ",".join(QUERY_METRICS)).split(","))
        bad = [m for m in names if m not in QUERY_METRICS] or len(set(names)) != len(names)
        if bad:
            raise typer.BadParameter(
                f"a comma-separated list of {', '.join(QUERY_METRICS)}, each once",
                param_hint="'--metrics'",
            )
        if by is not None and compare:
            raise typer.BadParameter("--by and --compare do not go together", param_hint="'--by'")
        if len(filters) > FILTERS_MAX:
            raise typer.BadParameter(f"at most {FILTERS_MAX}", param_hint="'--filter'")
        for text in filters:
            dimension, _, rest = text.partition(":")
            op, sep, _values = rest.partition(":")
            if dimension not in tuple(Dimension) or op not in FILTER_OPS or not sep:
                raise typer.BadParameter(
                    f"{text!r} is not DIM:OP:VALUE with DIM one of "
                    f"{', '.join(Dimension)} and OP one of {', '.join(FILTER_OPS)}",
                    param_hint="'--filter'",
                )
        return cls(names, by.value if by is not None else None, tuple(filters), compare)


def insight_query(
    site: str,
    want: InsightOptions,
    params: dict[str, Any],
    connection: Any,
    format: QueryFormat,
    all_rows: bool,
) -> None:
    """Ask the insight route the options name, over ``connection`` (what client_for
    gives), and print its answer."""
    interval = params.pop("interval")
    params.update(metrics=",".join(want.metrics), filter=list(want.filters))
    with connection as client:
        try:
            if want.by is not None:
                body = client.breakdown(site, by=want.by, **params)
            elif want.compare:
                body = client.totals(site, compare="previous_period", **params)
            else:
                body = client.timeseries(site, interval=interval, **params)
        except CALL_ERRORS as exc:
            fail(str(exc))
            return
    if format is QueryFormat.json:
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    header, rows = insight_rows(body, want)
    if format is QueryFormat.csv:
        lines = [",".join(header), *(",".join(_csv_cell(c) for c in row) for row in rows)]
        sys.stdout.write("\n".join(lines) + "\n")
        return
    print_insight(console, body, want, header, rows, (interval, params["tz"]), all_rows)


def insight_rows(body: dict[str, Any], want: InsightOptions) -> tuple[list[str], list[list[Any]]]:
    """The answer as a header and rows, the same for the table and CSV."""
    metrics = list(want.metrics)
    if want.by is not None:
        rows = [[r["value"], *(r[m] for m in metrics)] for r in body["results"]]
        return [want.by, *metrics], rows
    if want.compare:
        change = body.get("change") or {}
        previous = body.get("previous") or {}
        rows = [
            [m, body["metrics"][m], previous.get(m, ""), _percent(change.get(m))] for m in metrics
        ]
        return ["metric", "value", "previous", "change"], rows
    rows = [[p["t"], *(p[m] for m in metrics), p["provisional"]] for p in body["points"]]
    return ["t", *metrics, "provisional"], rows


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:+.1f}%"


def _csv_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def print_insight(
    out: Console,
    body: dict[str, Any],
    want: InsightOptions,
    header: list[str],
    rows: list[list[Any]],
    step: tuple[str, str],
    all_rows: bool,
) -> None:
    """A table of the rows; a series gets the sparkline of its first metric above it
    and a long one is cut in the middle unless ``all_rows``, as the plain series.
    ``step`` is the series' (interval, zone)."""
    interval, tz = step
    if want.by is None and not want.compare:
        counts = [{"t": p["t"], "count": p[want.metrics[0]]} for p in body["points"]]
        _print_chart(out, counts, interval)
    what = f"by {want.by}" if want.by else "totals" if want.compare else f"per {interval}"
    table = Table(title=f"{body['site']} {what} ({tz})")
    for name in header:
        table.add_column(name, justify="left" if name in ("t", "metric", want.by) else "right")
    cut = not all_rows and len(rows) > TABLE_ROWS_MAX
    shown = rows[:TABLE_ROWS_KEPT] + rows[-TABLE_ROWS_KEPT:] if cut else rows
    for i, row in enumerate(shown):
        if cut and i == TABLE_ROWS_KEPT:
            table.add_row(*(["..."] * len(header)))
        table.add_row(*(_cell(c) for c in row))
    out.print(table)
    if cut:
        out.print(
            Text(
                f"{len(rows) - len(shown)} of {len(rows)} rows left out (--all prints them)", "dim"
            )
        )
    if body.get("has_more"):
        out.print(Text("more values follow (--format json shows the page)", "dim"))
    if body.get("provisional"):
        out.print(Text("holds events not processed yet: numbers may still change", "dim"))


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    return "" if value is None else str(value)


QUERY_SPAN_MS = 24 * 3_600_000
MINUTE_MS = 60_000


def query_range(start: str | None, end: str | None, tz: str, now_ms: int) -> tuple[str, str]:
    """The range to ask for. Bounds given are sent as typed (the server reads them); a
    missing one is 24 h from the other; with neither, the 24 h up to the end of the
    current minute, so the newest (provisional) minute is in. ValueError for a given
    bound that cannot be read."""
    if start is None:
        if end is None:
            end_ms = -(-now_ms // MINUTE_MS) * MINUTE_MS
            return str(end_ms - QUERY_SPAN_MS), str(end_ms)
        return str(_epoch_ms(end, tz) - QUERY_SPAN_MS), end
    if end is None:
        return start, str(_epoch_ms(start, tz) + QUERY_SPAN_MS)
    return start, end


def _epoch_ms(value: str, tz: str) -> int:
    """A query time read as the server reads it (a date is midnight in ``tz``)."""
    # Imported here: it loads numpy, which the other commands need not wait for.
    from flowray.query.series import parse_time, parse_zone

    return parse_time(value, parse_zone(tz))


SPARK_BARS = " \u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"


def spark_run(count: int, width: int) -> int:
    """How many consecutive values one mark of a sparkline ``width`` wide stands for."""
    return max(1, -(-count // max(width, 1)))


def sparkline(values: Sequence[float], width: int) -> str:
    """One block character per run of consecutive values (their mean), at most ``width``
    of them, scaled from zero to the highest run: a blank is no traffic at all, the
    lowest block some, the full block the peak."""
    if not values or width < 1:
        return ""
    size = spark_run(len(values), width)
    runs = [values[i : i + size] for i in range(0, len(values), size)]
    means = [sum(run) / len(run) for run in runs]
    top = max(means)
    steps = len(SPARK_BARS) - 1
    if top <= 0:
        return SPARK_BARS[0] * len(means)
    return "".join(
        SPARK_BARS[0] if m <= 0 else SPARK_BARS[max(1, math.ceil(m / top * steps))] for m in means
    )


TABLE_ROWS_MAX = 40  # a longer table shows only its first and last TABLE_ROWS_KEPT rows
TABLE_ROWS_KEPT = 10


def print_series(
    out: Console, body: dict[str, Any], interval: str, tz: str, all_rows: bool
) -> None:
    """The sparkline of the series above its table; a long table is cut in the middle
    unless ``all_rows``."""
    points = body["points"]
    _print_chart(out, points, interval)
    cut = not all_rows and len(points) > TABLE_ROWS_MAX
    left_out = len(points) - 2 * TABLE_ROWS_KEPT if cut else 0
    table = Table(title=f"{body['site']} per {interval} ({tz})")
    table.add_column("t")
    table.add_column("count", justify="right")
    table.add_column("provisional")
    for i, p in enumerate(points[:TABLE_ROWS_KEPT] + points[-TABLE_ROWS_KEPT:] if cut else points):
        if cut and i == TABLE_ROWS_KEPT:
            table.add_row("...", "...", "")
        table.add_row(p["t"], str(p["count"]), "yes" if p["provisional"] else "")
    out.print(table)
    if cut:
        out.print(Text(f"{left_out} of {len(points)} rows left out (--all prints them)", "dim"))
    total = sum(p["count"] for p in points)
    out.print(f"total {total}; final up to {body['watermark'] or '(nothing processed yet)'}")


def _print_chart(out: Console, points: list[dict[str, Any]], interval: str) -> None:
    """The sparkline, as wide as the terminal, and what its ends and marks stand for."""
    if not any(p["count"] for p in points):
        out.print(Text("no events in this range", style="dim"))
        return
    width = max(out.width - 2, 10)
    line, size = sparkline([p["count"] for p in points], width), spark_run(len(points), width)
    peak = max(points, key=lambda p: p["count"])
    each = f"each mark {size} {interval}s" if size > 1 else f"each mark one {interval}"
    out.print(Text(line, style="cyan"))
    out.print(
        Text(
            f"{points[0]['t']} .. {points[-1]['t']}; {each}; peak {peak['count']} at {peak['t']}",
            style="dim",
        )
    )


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
            except CALL_ERRORS as exc:
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
