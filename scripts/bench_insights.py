"""Insight processing and queries, in one process, against baselines measured in the
same run.

One hour: events with every field (Zipf-like pages per site, real User-Agents, referrers with
UTM, visitors, 5% custom events) over one hour and many sites are cut into (shard,
hour) pieces as the log holds them, then mapped, reduced and written by flowray's own
functions (flowray/tasks/mapreduce.py) on one core. Baselines in the same run: the
same events without fields (count-only), and DuckDB grouping the raw events by the
same keys in one query. Then insight queries over the written facts, and the bytes
per raw event and per fact row.

A week: 7 days of such events over 100,000 sites, processed hour by hour and compacted
per shard-day as the processor does, then the server time (Server-Timing) of a 24-hour
minute series of visitors and pageviews and of the top 10 pages over 7 days, through
the HTTP app in-process, uncached and cached.

    .venv/bin/python scripts/bench_insights.py [--events 1000000] [--sites 10000]
        [--week-sites 100000] [--week-events-per-hour 100000] [--days 7]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowray.api.app import create_app  # noqa: E402
from flowray.api.insights import WarehouseInsights  # noqa: E402
from flowray.config import Settings  # noqa: E402
from flowray.core.router import ShardMap, shard_for_site  # noqa: E402
from flowray.ingest.pieces import to_ipc  # noqa: E402
from flowray.ingest.schema import EVENT_SCHEMA  # noqa: E402
from flowray.query.cache import MemoryCache  # noqa: E402
from flowray.tasks.mapreduce import map_block_slices, reduce_partials, write_units  # noqa: E402
from flowray.warehouse.catalog import Unit  # noqa: E402
from flowray.warehouse.files import Warehouse, merge_day, merged_path  # noqa: E402

HOUR = 490_000  # an hour number (2025-11-24)
SHARDS = 16
UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    f"Chrome/{v}.0.0.0 Safari/537.36"
    for v in range(110, 125)
] + [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
]
REFERRERS = [
    None,
    None,
    "https://www.google.com/",
    "https://duckduckgo.com/",
    "https://news.ycombinator.com/item?id=1",
    "https://t.co/abc",
]


def make_events(n: int, sites: int, rich: bool, seed: int = 5, hour: int = HOUR) -> pa.Table:
    rng = np.random.default_rng(seed)
    site_ids = np.minimum(rng.zipf(1.3, n), sites) - 1
    names = np.array([f"site{i}.example" for i in range(sites)], dtype=object)
    ts = hour * 3_600_000 + rng.integers(0, 3_600_000, n)
    columns = {"ts": ts, "site": names[site_ids]}
    nulls = [None] * n
    if rich:
        page = np.minimum(rng.zipf(1.5, n), 50)
        utm = rng.random(n) < 0.05
        paths = [
            f"/p{p}?utm_source=news" if u else f"/p{p}" for p, u in zip(page, utm, strict=True)
        ]
        visitor = site_ids * 1000 + rng.integers(0, 1 + n // (5 * sites) + 20, n)
        columns |= {
            "path": paths,
            "referrer": [REFERRERS[i] for i in rng.integers(0, len(REFERRERS), n)],
            "ua": [UAS[i] for i in rng.integers(0, len(UAS), n)],
            "visitor": [f"{v:016x}" for v in visitor],
            "name": ["Signup" if x else None for x in rng.random(n) < 0.05],
        }
    else:
        columns |= {"path": nulls, "referrer": nulls, "ua": nulls, "visitor": nulls, "name": nulls}
    columns |= {"id": nulls, "props": nulls}
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in EVENT_SCHEMA})


def pieces(events: pa.Table, hour: int = HOUR) -> list[tuple[tuple[int, int], list[bytes]]]:
    """The (shard, hour) pieces of about 2,000 events each, LZ4-compressed as the log holds them."""
    shard = np.array([shard_for_site(s, SHARDS) for s in events.column("site").to_pylist()])
    out = []
    for s in range(SHARDS):
        part = events.filter(pa.array(shard == s))
        payloads = [
            to_ipc(part.slice(i, 2000), compress=True) for i in range(0, part.num_rows, 2000)
        ]
        out.append(((s, hour), payloads))
    return out


def process(
    events: pa.Table, root: Path, job: str, hour: int = HOUR
) -> tuple[float, list[Unit], int]:
    blocks = pieces(events, hour)
    raw_bytes = sum(len(p) for _, ps in blocks for p in ps)
    started = time.perf_counter()
    partials = [map_block_slices([b], [ps], "default", 1)[0] for b, ps in blocks]
    reduced = reduce_partials(partials)
    units = write_units(root, "default", job, [reduced], [(s, hour, 1) for s in range(SHARDS)])
    return time.perf_counter() - started, units, raw_bytes


def duckdb_direct(events: pa.Table) -> float:
    con = duckdb.connect(config={"threads": 1})
    con.register("ev", events)
    started = time.perf_counter()
    con.sql(
        "SELECT site, ts // 60000 AS minute, hash(visitor) AS v, name, path, referrer, ua,"
        " count(*) FROM ev GROUP BY ALL"
    ).to_arrow_table()
    return time.perf_counter() - started


class _Listed:
    """The catalog's one question the insight engine asks, answered from a file list."""

    def __init__(self, files: dict[int, list[tuple[int, int, str]]]) -> None:
        self.files = files  # shard -> (first hour, hours, path)

    def unit_paths(self, _version: int, shard: int, hour_lo: int, hour_hi: int) -> list[str]:
        return [
            p
            for first, n, p in self.files.get(shard, [])
            if first < hour_hi and first + n > hour_lo
        ]


class _Week(Warehouse):
    def __init__(
        self, root: Path, files: dict[int, list[tuple[int, int, str]]], end: int, threads: int
    ) -> None:
        super().__init__(root, SHARDS, threads)
        self.catalog = _Listed(files)  # type: ignore[assignment]
        self.end_ms = end

    def snapshot(self) -> tuple[int, int, int | None]:
        return 1, 1, self.end_ms


def build_week(root: Path, sites: int, per_hour: int, days: int) -> tuple[dict, int, float]:
    """``days`` of facts, processed hour by hour and compacted per shard-day as the
    processor does; returns the files per shard, the events, and the seconds taken."""
    first_hour = HOUR - days * 24
    files: dict[int, list[tuple[int, int, str]]] = {}
    started = time.perf_counter()
    for day in range(days):
        hours: dict[int, list[str]] = {}
        for h in range(24):
            hour = first_hour + day * 24 + h
            events = make_events(per_hour, sites, rich=True, seed=hour, hour=hour)
            _t, units, _b = process(events, root, f"w{hour}", hour)
            for u in units:
                hours.setdefault(u.shard, []).append(u.path)
        for shard, paths in hours.items():
            day_number = (first_hour + day * 24) // 24
            out = merged_path(root, "default", shard, day_number, "week")
            merge_day(paths, out)
            files.setdefault(shard, []).append((first_hour + day * 24, 24, str(out)))
            for path in paths:
                Path(path).unlink()
    return files, days * 24 * per_hour, time.perf_counter() - started


async def week_queries(
    root: Path, files: dict, sites: int, rounds: int, threads: int
) -> dict[str, list[float]]:
    """Server time (Server-Timing) of the two insight queries the targets name, over
    sites half among the 100 largest and half uniform: uncached (each asked once), then
    cached (the same again)."""
    end = HOUR * 3_600_000
    warehouse = _Week(root, files, end, threads)
    app = create_app(
        settings=Settings(data_dir=root / "app", shards=SHARDS, groups=1),
        shard_map=ShardMap.round_robin(SHARDS, 1),
        ingest=None,  # type: ignore[arg-type]
        warehouse=warehouse,
        admin=None,  # type: ignore[arg-type]
        cache=MemoryCache(),
        insights=WarehouseInsights(warehouse, None, 30.0),
    )
    rng = random.Random(11)
    chosen = [
        f"site{rng.randrange(100) if i % 2 else rng.randrange(sites)}.example"
        for i in range(rounds)
    ]
    asks = {
        "24-hour minute series of visitors and pageviews": lambda s: (
            f"/v1/sites/{s}/timeseries",
            {
                "start": end - 86_400_000,
                "end": end,
                "interval": "minute",
                "metrics": "visitors,pageviews",
            },
        ),
        "top-10 pages over 7 days": lambda s: (
            f"/v1/sites/{s}/breakdown",
            {"by": "path", "start": end - 7 * 86_400_000, "end": end, "limit": 10},
        ),
    }
    out: dict[str, list[float]] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for name, ask in asks.items():
            for kind in ("uncached", "cached"):
                found = out.setdefault(f"{name}, {kind}", [])
                for site in dict.fromkeys(chosen):
                    path, params = ask(site)
                    answer = await client.get(path, params=params)
                    assert answer.status_code == 200, answer.text
                    timing = answer.headers["server-timing"]
                    found.append(float(timing.split("dur=")[1]))
    return out


def _percentiles(ms: list[float]) -> str:
    ms = sorted(ms)
    p99 = ms[max(0, int(len(ms) * 0.99) - 1)]
    return f"p50 {statistics.median(ms):7.2f} ms  p99 {p99:7.2f} ms  (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--week-sites", type=int, default=100_000)
    parser.add_argument("--week-events-per-hour", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--skip-hour", action="store_true", help="only the week's queries")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="DuckDB threads per query, each"
    )
    args = parser.parse_args()
    if not args.skip_hour:
        one_hour(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, events, took = build_week(
            root, args.week_sites, args.week_events_per_hour, args.days
        )
        size = sum(Path(p).stat().st_size for fs in files.values() for _f, _n, p in fs)
        print(
            f"week: {args.days} days x {args.week_events_per_hour:,} events/h over "
            f"{args.week_sites:,} sites = {events:,} events, processed and compacted in "
            f"{took:.0f} s; warehouse {size / 2**20:,.0f} MiB ({size / events:.1f} B/event)"
        )
        for threads in args.threads:
            timings = asyncio.run(week_queries(root, files, args.week_sites, args.queries, threads))
            for name, ms in timings.items():
                print(f"query, {threads} DuckDB thread(s): {name:62s} {_percentiles(ms)}")


def one_hour(args: argparse.Namespace) -> None:
    rich = make_events(args.events, args.sites, rich=True)
    plain = make_events(args.events, args.sites, rich=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_rich, units, raw_bytes = process(rich, root / "rich", "r")
        t_plain, plain_units, _ = process(plain, root / "plain", "p")
        t_duck = duckdb_direct(rich)
        rows = sum(u.rows for u in units)
        fact_bytes = sum(Path(u.path).stat().st_size for u in units)
        print(f"events {args.events:,}, sites {args.sites:,}, one core")
        print(f"process with fields   {t_rich:6.2f} s  {args.events / t_rich:,.0f} events/s")
        print(f"process count-only    {t_plain:6.2f} s  {args.events / t_plain:,.0f} events/s")
        print(f"duckdb direct (group) {t_duck:6.2f} s  ratio flowray/duckdb {t_rich / t_duck:.1f}x")
        print(f"raw log bytes/event   {raw_bytes / args.events:6.1f}")
        print(f"fact rows/event       {rows / args.events:6.3f}")
        print(f"warehouse bytes/row   {fact_bytes / rows:6.1f}")
        print(f"warehouse bytes/event {fact_bytes / args.events:6.1f}")
        assert pq.read_metadata(units[0].path).num_columns == 13  # plain Parquet


if __name__ == "__main__":
    main()
