#!/usr/bin/env python3
"""Processing benchmark: one hour at the fleet rate, beside DuckDB on the same raw data.

    .venv/bin/python scripts/bench_process.py [--events 41700000] [--scales 1,2,4]
        [--sites 100000] [--markdown FILE]

For each scale k (k x --events events in one hour), in one run on this machine:
1. the events are generated (sites skewed: a few big, a long tail), written as
   seed-form raw lines (``2020.03.14 07:20:39.595 taobao.com``) and committed into a
   local flowray cluster (2 groups x 3 replicas, 8 shards) through the same ingest
   path the API uses (RayIngest: majority fsync, every byte replicated), so the hour
   sits in the replicated raw log as sealed blocks, as in production;
2. **flowray** processes the hour: seal, map tasks reading block slices from a caught-up
   follower, reduce, sorted Parquet units, atomic publish. Timed end to end, with the
   peak memory (PSS, so shared pages count once) of every process of the Ray session;
3. **DuckDB** aggregates the same raw lines directly (read the text, count per (site,
   minute), sorted Parquet out), using every core, in a child process whose peak RSS is
   measured; and, as a second baseline, from the events already in Parquet (ts, site);
4. the two outputs are compared: every (site, minute) count must be equal.
Ingest is not part of the processing time; it is reported for scale.

With ``--fields`` the events carry every field a tracker sends (Zipf-like pages per
site, 5% with UTM parameters, referrers, real User-Agents, visitors, 5% custom
events) and are committed as Arrow pieces (seed lines cannot carry fields); flowray
derives and keeps every insight dimension, and the DuckDB baseline groups the same
raw events from Parquet by (site, minute, visitor, name, path, referrer, User-Agent)
in one query. Counts per (site, minute) and distinct visitors per site must agree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from flowray.actors.directory import Directory  # noqa: E402
from flowray.cluster import control as cluster  # noqa: E402
from flowray.config import Settings  # noqa: E402
from flowray.core.router import ShardMap  # noqa: E402
from flowray.ingest.events import EVENT_SCHEMA  # noqa: E402
from flowray.ingest.pieces import route  # noqa: E402
from flowray.serve.deployment import RayIngest  # noqa: E402
from flowray.warehouse.catalog import Catalog  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_insights import REFERRERS, UAS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOUR_MS = 3_600_000
FLEET_HOUR_EVENTS = 41_700_000
RAW_SCHEMA = pa.schema([("ts", pa.int64()), ("site", pa.string())])
CHUNK_EVENTS = 500_000  # events per generated chunk (and per ingest call)
INFLIGHT_CHUNKS = 4
PROCESS_TIMEOUT_S = 3600.0

DUCKDB_SCRIPT = r"""
import resource, sys, time, duckdb
src, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
con = duckdb.connect(config={"threads": int(sys.argv[4])})
con.execute("SET enable_progress_bar = false")
if kind == "text":
    source = (
        "SELECT d || ' ' || t AS stamp, site FROM read_csv(?, delim=' ', header=false,"
        " columns={'d': 'VARCHAR', 't': 'VARCHAR', 'site': 'VARCHAR'}, quote='', escape='')"
    )
    minute = "strptime(left(stamp, 16), '%Y.%m.%d %H:%M')"
else:
    source = "SELECT * FROM read_parquet(?)"
    minute = "make_timestamp((ts // 60000) * 60000 * 1000)"
keys = ", hash(visitor) AS visitor, name, path, referrer, ua" if kind == "fields" else ""
started = time.perf_counter()
con.execute(
    f"COPY (SELECT site, {minute} AS minute{keys}, count(*)::BIGINT AS count FROM ({source})"
    f" GROUP BY ALL ORDER BY site, minute) TO '{out}' (FORMAT parquet, COMPRESSION zstd)",
    [src],
)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{seconds} {peak}")
"""


def pss_mib(root_pid: int) -> float:
    """Proportional set size of ``root_pid`` and all its descendants (shared pages split)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    family, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in family:
                family.add(child)
                frontier.append(child)
    total = 0
    for pid in family:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


class PeakSampler:
    """Samples pss_mib of this process tree every ``interval_s`` in a thread."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_mib(os.getpid()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def site_names(count: int) -> pa.Array:
    return pa.array([f"site{i}.example" for i in range(count)], type=pa.string())


def make_chunk(rng: np.random.Generator, n: int, hour_ms: int, names: pa.Array) -> pa.Table:
    """``n`` events in the hour: site i drawn with weight ~ 1/(i+10) (a long tail)."""
    u = rng.random(n)
    count = len(names)
    # Inverse CDF of a truncated 1/(x+10) density over [0, count).
    idx = (10 * ((count + 10) / 10) ** u - 10).astype(np.int64).clip(0, count - 1)
    ts = hour_ms + rng.integers(0, HOUR_MS, n, dtype=np.int64)
    columns = {"ts": pa.array(ts), "site": names.take(pa.array(idx))}
    for field in EVENT_SCHEMA:
        if field.name not in columns:
            columns[field.name] = pa.nulls(n, type=field.type)
    return pa.table(columns, schema=EVENT_SCHEMA)


def with_fields(rng: np.random.Generator, table: pa.Table, chunks: int) -> pa.Table:
    """The chunk's events (one of ``chunks`` in the hour) with every field a tracker
    sends, drawn vectorized: a page of the site (Zipf-like, 50 at most; 5% with UTM
    parameters), a referrer, a User-Agent, a visitor (a site's visitors view 2.5 pages
    an hour on average) and 5% custom events."""
    n = table.num_rows
    page = np.minimum(rng.zipf(1.5, n), 50) - 1
    utm = rng.random(n) < 0.05
    paths = pa.array([f"/p{p}" for p in range(50)] + [f"/p{p}?utm_source=news" for p in range(50)])
    site = pc.index_in(table.column("site"), value_set=pc.unique(table.column("site")))
    site_n = site.to_numpy(zero_copy_only=False)
    per_hour = np.bincount(site_n)[site_n] * chunks  # each event's site's events this hour
    visitor = site_n.astype(np.uint64) << np.uint64(32)
    visitor += (rng.random(n) * np.maximum(1, per_hour / 2.5)).astype(np.uint64)
    fields = {
        "path": paths.take(pa.array(page + 50 * utm)),
        "referrer": pa.array(REFERRERS, pa.string()).take(
            pa.array(rng.integers(0, len(REFERRERS), n))
        ),
        "ua": pa.array(UAS).take(pa.array(rng.integers(0, len(UAS), n))),
        "visitor": pc.cast(pa.array(visitor), pa.string()),
        "name": pc.if_else(pa.array(rng.random(n) < 0.05), "Signup", pa.scalar(None, pa.string())),
    }
    for name, column in fields.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def seed_lines(table: pa.Table) -> pa.Table:
    """A chunk as seed-form raw lines: ``YYYY.MM.DD HH:MM:SS.mmm site``."""
    stamps = pc.strftime(
        table.column("ts").cast(pa.timestamp("ms", tz="UTC")), format="%Y.%m.%d %H:%M:%S"
    )
    return pa.table({"line": pc.binary_join_element_wise(stamps, table.column("site"), " ")})


async def ingest_hour(
    settings: Settings,
    hour_ms: int,
    events: int,
    names: pa.Array,
    text: Path,
    raw: Path,
    fields: bool = False,
) -> float:
    """Commit ``events`` generated events into the cluster; write them as seed lines
    (unless they carry ``fields``) and as Parquet too. Returns the seconds spent
    committing."""
    shard_map = ShardMap.round_robin(settings.shards, settings.groups)
    ingest = RayIngest(settings, Directory(settings))
    rng = np.random.default_rng(hour_ms // HOUR_MS)
    committing = 0.0
    pending: set[asyncio.Task[None]] = set()
    text_options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with (
        pacsv.CSVWriter(
            text, pa.schema([("line", pa.string())]), write_options=text_options
        ) as text_out,
        pq.ParquetWriter(raw, EVENT_SCHEMA if fields else RAW_SCHEMA) as raw_out,
    ):
        sent = 0
        started = time.perf_counter()
        while sent < events:
            n = min(CHUNK_EVENTS, events - sent)
            chunk = make_chunk(rng, n, hour_ms, names)
            if fields:
                chunk = with_fields(rng, chunk, -(-events // CHUNK_EVENTS))
                raw_out.write_table(chunk)
            else:
                text_out.write_table(seed_lines(chunk))
                raw_out.write_table(chunk.select(["ts", "site"]))
            pending.add(asyncio.create_task(ingest.commit(route(chunk, shard_map))))
            if len(pending) >= INFLIGHT_CHUNKS:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            sent += n
            print(f"\r  ingest: {sent:,}/{events:,}", end="", file=sys.stderr, flush=True)
        for task in pending:
            await task
        committing = time.perf_counter() - started
    print(file=sys.stderr)
    return committing


def duckdb_baseline(src: Path, kind: str, out: Path, threads: int) -> tuple[float, float]:
    result = subprocess.run(
        [sys.executable, "-c", DUCKDB_SCRIPT, str(src), kind, str(out), str(threads)],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
        check=True,
    )
    seconds, peak = result.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(peak)


def compare(units: list[str], baseline: Path) -> tuple[int, int]:
    """(rows that differ, rows compared) between flowray's units and DuckDB's output,
    as counts per (site, minute)."""
    con = duckdb.connect()
    diff = con.execute(
        "SELECT site, m FROM (SELECT site, epoch_ms(minute) AS m, count FROM read_parquet(?)"
        " UNION ALL SELECT site, epoch_ms(minute), -count FROM read_parquet(?))"
        " GROUP BY site, m HAVING sum(count) <> 0",
        [units, str(baseline)],
    ).fetchall()
    rows = con.execute(
        "SELECT count(*) FROM (SELECT DISTINCT site, minute FROM read_parquet(?))",
        [str(baseline)],
    ).fetchone()
    return len(diff), int(rows[0]) if rows else 0


def compare_visitors(units: list[str], baseline: Path) -> tuple[int, int]:
    """(sites whose distinct visitors over the hour differ, sites) between flowray's
    units and DuckDB's output; both hash visitors with DuckDB's hash."""
    con = duckdb.connect()
    per_site = "SELECT site, count(DISTINCT visitor) AS v FROM read_parquet(?) GROUP BY site"
    differing, sites = con.execute(
        f"SELECT count(*) FILTER (WHERE a.v IS DISTINCT FROM b.v), count(*)"
        f" FROM ({per_site}) a FULL OUTER JOIN ({per_site}) b USING (site)",
        [units, str(baseline)],
    ).fetchone() or (0, 0)
    return int(differing), int(sites)


def run_scale(
    settings: Settings, running: cluster.Cluster, scale: int, hour_ms: int, args: Any, work: Path
) -> dict[str, Any]:
    events = args.events * scale
    names = site_names(args.sites)
    text, raw = work / f"hour{scale}.log", work / f"hour{scale}.parquet"
    print(f"scale {scale}x: {events:,} events", file=sys.stderr)
    ingest_s = asyncio.run(
        ingest_hour(settings, hour_ms, events, names, text, raw, fields=args.fields)
    )
    base_pss = pss_mib(os.getpid())
    with PeakSampler() as sampler:
        started = time.perf_counter()
        summary = ray.get(running.processor.run.remote("closed"), timeout=PROCESS_TIMEOUT_S)
        process_s = time.perf_counter() - started
    catalog = Catalog(settings.warehouse_dir / "catalog.sqlite")
    version = catalog.current_version()
    paths = [u.path for u in catalog.units(version) if u.hour == hour_ms // HOUR_MS]
    catalog.close()
    threads = os.cpu_count() or 2
    duck_text_s = duck_text_peak = 0.0
    if not args.fields:
        duck_text_s, duck_text_peak = duckdb_baseline(
            text, "text", work / "duck_text.parquet", threads
        )
    kind = "fields" if args.fields else "parquet"
    duck_pq_s, duck_pq_peak = duckdb_baseline(raw, kind, work / "duck_pq.parquet", threads)
    differing, rows = compare(paths, work / "duck_pq.parquet")
    visitors_differing, sites = (
        compare_visitors(paths, work / "duck_pq.parquet") if args.fields else (0, 0)
    )
    out = {
        "fields": args.fields,
        "scale": scale,
        "events": events,
        "published_events": summary["events"],
        "units": summary["units"],
        "seal_s": summary.get("seal_s"),
        "map_s": summary.get("map_s"),
        "reduce_write_s": summary.get("reduce_write_s"),
        "ingest_s": round(ingest_s, 1),
        "process_s": round(process_s, 2),
        "events_per_s": round(events / process_s),
        "peak_pss_mib": round(sampler.peak),
        "pss_before_mib": round(base_pss),
        "duckdb_text_s": round(duck_text_s, 2),
        "duckdb_text_peak_mib": round(duck_text_peak),
        "duckdb_parquet_s": round(duck_pq_s, 2),
        "duckdb_parquet_peak_mib": round(duck_pq_peak),
        "ratio_text": round(process_s / duck_text_s, 2) if duck_text_s else None,
        "ratio_parquet": round(process_s / duck_pq_s, 2),
        "rows": rows,
        "rows_differing": differing,
        "sites": sites,
        "sites_visitors_differing": visitors_differing,
        "raw_parquet_mib": round(raw.stat().st_size / 2**20),
    }
    print(json.dumps(out), file=sys.stderr)
    text.unlink()
    raw.unlink()
    return out


def bench_settings(work: Path, namespace: str, **extra: Any) -> Settings:
    """A local cluster for the processing and memory benchmarks: 2 groups x 3 replicas,
    8 shards, no Redis, processing only when the benchmark asks."""
    values: dict[str, Any] = {
        "data_dir": work / "data",
        "namespace": namespace,
        "groups": 2,
        "replicas": 3,
        "shards": 8,
        "redis_url": "",
        "seal_grace_s": 0,
        "process_interval_s": 10**6,
        # The generator and the text writer share the two cores with the replicas; at
        # the default 0.5 s election timeout a starved follower would call elections
        # mid-load, and a retried write without ids could count twice. Ingest is not
        # what these measure, so the groups wait 3 s of silence before an election.
        "election_ticks": 60,
        "num_cpus": os.cpu_count() or 2,
    }
    return Settings(**(values | extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=FLEET_HOUR_EVENTS)
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--sites", type=int, default=100_000)
    parser.add_argument("--reduce-keys", type=int, default=4)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument(
        "--fields",
        action="store_true",
        help="events with every field a tracker sends, against DuckDB grouping them by"
        " (site, minute, visitor, name, path, referrer, User-Agent) from Parquet",
    )
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-process-", dir=ROOT))
    settings = bench_settings(
        work,
        "flowray-bench-process",
        reduce_keys=args.reduce_keys,
        process_timeout_s=PROCESS_TIMEOUT_S,
    )
    results = []
    try:
        running = cluster.start(settings, serve_app=False)
        settings = running.settings
        first_hour = (int(time.time() * 1000) // HOUR_MS - 48) * HOUR_MS
        for i, scale in enumerate(scales):
            results.append(
                run_scale(settings, running, scale, first_hour + i * HOUR_MS, args, work)
            )
        cluster.stop(running, serve_app=False)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    report = render(results, args)
    print(report)
    if args.markdown:
        args.markdown.write_text(report)


def render(results: list[dict[str, Any]], args: Any) -> str:
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: "
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"{args.sites:,} sites, reduce keys {args.reduce_keys}.",
        "",
        "| scale | events | flowray processing | events/s | peak memory (PSS, whole Ray"
        " session) | DuckDB from raw lines | flowray / DuckDB (lines) | DuckDB from Parquet"
        " | flowray / DuckDB (Parquet) | (site, minute) rows, differing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if args.fields:
        return render_fields(results, lines[0])
    for r in results:
        lines.append(
            f"| {r['scale']}x | {r['events']:,} | {r['process_s']} s | {r['events_per_s']:,}"
            f" | {r['peak_pss_mib']:,} MiB (before: {r['pss_before_mib']:,}) |"
            f" {r['duckdb_text_s']} s ({r['duckdb_text_peak_mib']:,} MiB) | {r['ratio_text']}"
            f" | {r['duckdb_parquet_s']} s | {r['ratio_parquet']} |"
            f" {r['rows']:,}, {r['rows_differing']} |"
        )
    return "\n".join(lines) + "\n"


def render_fields(results: list[dict[str, Any]], heading: str) -> str:
    lines = [
        heading + " Events with every field (path, referrer, User-Agent, visitor, 5% custom).",
        "",
        "| scale | events | flowray processing | events/s | peak memory (PSS, whole Ray"
        " session) | DuckDB grouping the raw events (Parquet) | flowray / DuckDB |"
        " (site, minute) rows, differing | sites, visitors differing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['scale']}x | {r['events']:,} | {r['process_s']} s | {r['events_per_s']:,}"
            f" | {r['peak_pss_mib']:,} MiB (before: {r['pss_before_mib']:,}) |"
            f" {r['duckdb_parquet_s']} s ({r['duckdb_parquet_peak_mib']:,} MiB) |"
            f" {r['ratio_parquet']} | {r['rows']:,}, {r['rows_differing']} |"
            f" {r['sites']:,}, {r['sites_visitors_differing']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
