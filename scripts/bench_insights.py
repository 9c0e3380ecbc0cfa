"""Insight processing and queries, in one process, against baselines measured in the
same run.

Events with every field (Zipf-like pages per site, real User-Agents, referrers with
UTM, visitors, 5% custom events) over one hour and many sites are cut into (shard,
hour) pieces as the log holds them, then mapped, reduced and written by flowray's own
functions (flowray/tasks/mapreduce.py) on one core. Baselines in the same run: the
same events without fields (count-only), and DuckDB grouping the raw events by the
same keys in one query. Then insight queries over the written facts, and the bytes
per raw event and per fact row.

    .venv/bin/python scripts/bench_insights.py [--events 1000000] [--sites 10000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowray.core.router import shard_for_site  # noqa: E402
from flowray.ingest.pieces import to_ipc  # noqa: E402
from flowray.ingest.schema import EVENT_SCHEMA  # noqa: E402
from flowray.query.insights import InsightQuery, parse_filter  # noqa: E402
from flowray.tasks.mapreduce import map_block_slices, reduce_partials, write_units  # noqa: E402
from flowray.warehouse.files import Warehouse  # noqa: E402

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


def make_events(n: int, sites: int, rich: bool, seed: int = 5) -> pa.Table:
    rng = np.random.default_rng(seed)
    site_ids = np.minimum(rng.zipf(1.3, n), sites) - 1
    names = np.array([f"site{i}.example" for i in range(sites)], dtype=object)
    ts = HOUR * 3_600_000 + rng.integers(0, 3_600_000, n)
    columns = {"ts": ts, "site": names[site_ids]}
    nulls = [None] * n
    if rich:
        page = np.minimum(rng.zipf(1.5, n), 50)
        utm = rng.random(n) < 0.05
        paths = [f"/p{p}?utm_source=news" if u else f"/p{p}" for p, u in zip(page, utm)]
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


def pieces(events: pa.Table) -> list[tuple[tuple[int, int], list[bytes]]]:
    """The (shard, hour) pieces of about 2,000 events each that the log would hold."""
    shard = np.array([shard_for_site(s, SHARDS) for s in events.column("site").to_pylist()])
    out = []
    for s in range(SHARDS):
        part = events.filter(pa.array(shard == s))
        payloads = [to_ipc(part.slice(i, 2000)) for i in range(0, part.num_rows, 2000)]
        out.append(((s, HOUR), payloads))
    return out


def process(events: pa.Table, root: Path, job: str) -> tuple[float, list, int]:
    blocks = pieces(events)
    raw_bytes = sum(len(p) for _, ps in blocks for p in ps)
    started = time.perf_counter()
    partials = [map_block_slices([b], [ps], "default", 1)[0] for b, ps in blocks]
    reduced = reduce_partials(partials)
    units = write_units(root, "default", job, [reduced], [(s, HOUR, 1) for s in range(SHARDS)])
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


def queries(root: Path, units: list, sites: int) -> dict[str, list[float]]:
    warehouse = Warehouse(root, SHARDS)
    zone = ZoneInfo("Europe/Berlin")
    start, end = HOUR * 3_600_000, (HOUR + 1) * 3_600_000
    rng = random.Random(3)
    found: dict[str, list[float]] = {"series": [], "top pages": [], "filtered series": []}
    paths = [u.path for u in units]
    for i in range(200):
        site = "site0.example" if i % 10 == 0 else f"site{rng.randrange(sites)}.example"
        asks = {
            "series": InsightQuery(site, start, end, zone, interval="minute"),
            "top pages": InsightQuery(site, start, end, zone, dimensions=("path",), limit=10),
            "filtered series": InsightQuery(
                site, start, end, zone, interval="minute", filters=(parse_filter("path:is:/p1"),)
            ),
        }
        for name, query in asks.items():
            began = time.perf_counter()
            _direct_query(warehouse, query, paths)
            found[name].append((time.perf_counter() - began) * 1000)
    return found


def _direct_query(warehouse: Warehouse, query: InsightQuery, paths: list[str]) -> None:
    """Warehouse.insight, with the unit paths given (the catalog is not built here)."""
    shard = shard_for_site(query.site, SHARDS)
    mine = [p for p in paths if f"/s{shard:04d}/" in p]
    original = warehouse.catalog.unit_paths
    warehouse.catalog.unit_paths = lambda *_a, **_k: mine  # type: ignore[method-assign]
    try:
        warehouse.insight(query, 1, None)
    finally:
        warehouse.catalog.unit_paths = original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=10_000)
    args = parser.parse_args()
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
        for name, ms in queries(root / "rich", units, args.sites).items():
            ms.sort()
            p99 = ms[int(len(ms) * 0.99) - 1]
            print(f"query {name:16s} p50 {statistics.median(ms):6.1f} ms  p99 {p99:6.1f} ms")
        assert pq.read_metadata(units[0].path).num_columns == 13  # plain Parquet


if __name__ == "__main__":
    main()
