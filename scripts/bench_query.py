#!/usr/bin/env python3
"""Query benchmark over a warehouse of 100,000 sites x 24 hours.

    .venv/bin/python scripts/bench_query.py [--sites 100000] [--requests 400]

Builds the warehouse directly (the same writer the processor uses), starts flowray on
it, and measures a 24-hour minute series of one site (1,440 points):
- cached (the same query again) and uncached (a different site each time) latency,
  p50/p99, seen by a light client on loopback (an upper bound of the server's time);
- requests/s of a cached query through Ray Serve and through the same app under
  plain uvicorn (the ingest gateway), with their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import RawHttp, ensure_tool, free_port, publish  # noqa: E402

from flowray.cluster.control import SITE_RULE_FILE  # noqa: E402
from flowray.core.router import (
    SITE_RULE,  # noqa: E402
    shard_for_site,  # noqa: E402
)
from flowray.query.cache import redis_answers  # noqa: E402
from flowray.storage.durable import write_json_atomic  # noqa: E402
from flowray.warehouse.catalog import Catalog, Unit  # noqa: E402
from flowray.warehouse.files import (  # noqa: E402
    Warehouse,
    merge_day,
    merged_path,
    unit_path,
    write_unit,
)

ROOT = Path(__file__).resolve().parent.parent
FLOWRAY = [sys.executable, "-m", "flowray"]
SHARDS, GROUPS = 8, 2
DAY_START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BUSY_EVERY = 100  # one site in a hundred has traffic every minute


def site_name(i: int) -> str:
    return f"site{i:06d}.example"


def build_warehouse(data_dir: Path, sites: int, seed: int = 1) -> int:
    """Write 24 hourly units per shard; returns the rows written."""
    rng = np.random.default_rng(seed)
    names_list = [site_name(i) for i in range(sites)]
    shard_of = np.array([shard_for_site(n, SHARDS) for n in names_list])
    names = pa.array(names_list, pa.string())
    warehouse = Warehouse(data_dir / "warehouse", SHARDS)
    units, rows = [], 0
    for hour in range(24):
        hour_ms = DAY_START_MS + hour * 3_600_000
        for shard in range(SHARDS):
            members = np.flatnonzero(shard_of == shard)
            table = _unit_rows(rng, members, names, hour_ms)
            path = unit_path(warehouse.root, "default", shard, hour_ms // 3_600_000, "bench")
            write_unit(path, table)
            units.append(
                Unit(
                    shard,
                    hour_ms // 3_600_000,
                    str(path),
                    1,
                    table.num_rows,
                    int(np.sum(table.column("count").to_numpy())),
                )
            )
            rows += table.num_rows
    warehouse.catalog.publish(units, {})
    warehouse.catalog.close()
    write_json_atomic(data_dir / "layout.json", {"groups": GROUPS, "replicas": 3, "shards": SHARDS})
    # Written under today's site rule (its names are ASCII, which both rules agree on).
    write_json_atomic(data_dir / SITE_RULE_FILE, {"site_rule": SITE_RULE})
    return rows


def _unit_rows(
    rng: np.random.Generator, members: np.ndarray, names: pa.Array, hour_ms: int
) -> pa.Table:
    """A sparse hour: busy sites every minute, the others in 0-5 random minutes."""
    busy = members[members % BUSY_EVERY == 0]
    quiet = members[members % BUSY_EVERY != 0]
    k = rng.integers(0, 6, size=len(quiet))
    quiet_sites = np.repeat(quiet, k)
    quiet_minutes = rng.integers(0, 60, size=len(quiet_sites))
    keys = np.concatenate(
        [
            np.repeat(busy, 60) * 60 + np.tile(np.arange(60), len(busy)),
            quiet_sites * 60 + quiet_minutes,
        ]
    )
    keys = np.unique(keys)  # sorted by site index, then minute
    idx, minute = keys // 60, keys % 60
    counts = rng.integers(1, 50, size=len(idx))
    return pa.table(
        {
            "site": names.take(pa.array(idx)),
            "minute": pa.array(hour_ms + minute * 60_000, pa.timestamp("ms", tz="UTC")),
            "count": pa.array(counts, pa.int64()),
        }
    )


async def latencies(port: int, paths: list[str]) -> tuple[list[float], list[float]]:
    """(client-seen ms, server-reported ms from Server-Timing), each sorted."""
    client = RawHttp("127.0.0.1", port, 1)
    await client.open()
    seen, server = [], []
    for path in paths:
        t = time.perf_counter()
        status, app_ms = await _get(client, path)
        seen.append((time.perf_counter() - t) * 1000)
        server.append(app_ms)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}")
    await client.close()
    return sorted(seen), sorted(server)


async def _get(client: RawHttp, path: str) -> tuple[int, float]:
    reader, writer = await client.free.get()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status_line = await reader.readline()
    length, app_ms = 0, float("nan")
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "server-timing":
            app_ms = float(value.split("dur=")[1])
    await reader.readexactly(length)
    client.free.put_nowait((reader, writer))
    return int(status_line.split()[1]), app_ms


def query(site: str) -> str:
    return (
        f"/v1/sites/{site}/traffic?start=2026-01-01T00:00:00Z"
        "&end=2026-01-02T00:00:00Z&interval=minute&tz=UTC"
    )


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    ensure_tool("wrk", "wrk")
    tmp = Path(tempfile.mkdtemp(prefix="bench-query-", dir=ROOT))
    data = tmp / "data"
    started = time.monotonic()
    rows = build_warehouse(data, args.sites)
    built_s = time.monotonic() - started
    port, gateway = free_port(), free_port()
    redis_url = "redis://127.0.0.1:6379/0" if redis_answers("redis://127.0.0.1:6379/0") else ""
    # No processing cycles during the run: the processor would compact the day itself,
    # and the hourly files are measured first.
    env = dict(
        os.environ,
        FLOWRAY_DATA_DIR=str(data),
        FLOWRAY_REDIS_URL=redis_url,
        FLOWRAY_PROCESS_INTERVAL_S="86400",
    )
    env.pop("RAY_ADDRESS", None)
    up = subprocess.run(
        [
            *FLOWRAY,
            "up",
            "--detach",
            "--port",
            str(port),
            "--ingest-port",
            str(gateway),
            "--groups",
            str(GROUPS),
            "--shards",
            str(SHARDS),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode != 0:
        sys.exit(f"flowray up failed: {up.stdout}{up.stderr}")
    # One processing cycle sets the watermark, so answers are final and cached for an
    # hour (the loop, which would also compact, is off for this run).
    subprocess.run([*FLOWRAY, "process"], env=env, capture_output=True, timeout=300, check=True)
    results: dict[str, Any] = {
        "sites": args.sites,
        "rows": rows,
        "build_s": built_s,
        "cache": "redis" if redis_url else "memory",
    }
    try:
        busy = [site_name(i) for i in range(0, args.sites, BUSY_EVERY)]
        for name, p in (("uvicorn", gateway), ("serve", port)):
            # Warm-up on sites not measured after: file metadata caches, connections.
            asyncio.run(latencies(p, [query(busy[(i * 7 + 5) % len(busy)]) for i in range(50)]))
            fresh = [
                query(busy[(i * 7 + (name == "serve")) % len(busy)])
                for i in range(args.requests // 2)
            ]
            uncached, uncached_app = asyncio.run(latencies(p, fresh))
            cached, cached_app = asyncio.run(latencies(p, [query(busy[0])] * args.requests))
            for kind, seen, app in (
                ("uncached", uncached, uncached_app),
                ("cached", cached, cached_app),
            ):
                results[f"{name}_{kind}_p50_ms"] = pct(seen, 0.5)
                results[f"{name}_{kind}_p99_ms"] = pct(seen, 0.99)
                results[f"{name}_{kind}_app_p50_ms"] = pct(app, 0.5)
                results[f"{name}_{kind}_app_p99_ms"] = pct(app, 0.99)
            results[f"{name}_cached_rps"] = _wrk_get(p, query(busy[0]), args.seconds)
        # Compaction: every shard's day merged into one file, then uncached queries of
        # other sites again (a merge keeps the generation: cached answers stay valid).
        started = time.monotonic()
        results["merged_days"] = compact_all(data / "warehouse")
        results["compact_s"] = time.monotonic() - started
        fresh = [query(busy[(i * 7 + 3) % len(busy)]) for i in range(args.requests // 2)]
        seen, app = asyncio.run(latencies(gateway, fresh))
        results["merged_uncached_app_p50_ms"] = pct(app, 0.5)
        results["merged_uncached_app_p99_ms"] = pct(app, 0.99)
        results["merged_uncached_p50_ms"] = pct(seen, 0.5)
        results["merged_uncached_p99_ms"] = pct(seen, 0.99)
    finally:
        subprocess.run([*FLOWRAY, "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    publish(render(results), results, args.markdown)


def compact_all(root: Path) -> int:
    """Merge every shard-day of the warehouse, as the processor's compaction does."""
    catalog = Catalog(root / "catalog.sqlite")
    version = catalog.current_version()
    days = catalog.mergeable_days(version, 10**9, 10**6)
    for shard, day in days:
        units = catalog.day_units(version, shard, day)
        out = merged_path(root, "default", shard, day, "bench")
        rows, events = merge_day([u.path for u in units], out)
        unit = Unit(shard, day * 24, str(out), 0, rows, events)
        if not catalog.add_merged(version, shard, day, [u.path for u in units], unit):
            raise RuntimeError(f"shard {shard} day {day} changed while merging")
    catalog.close()
    return len(days)


def _wrk_get(port: int, path: str, seconds: float) -> float:
    """Requests/s of one GET with wrk (16 connections)."""
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{int(seconds)}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(out)


def render(r: dict[str, Any]) -> str:
    ratio = r["uvicorn_cached_rps"] / max(r["serve_cached_rps"], 1.0)
    rows = [
        f"| {label} | {r[k + '_uncached_app_p50_ms']:.1f} / {r[k + '_uncached_app_p99_ms']:.1f} "
        f"ms | {r[k + '_cached_app_p50_ms']:.2f} / {r[k + '_cached_app_p99_ms']:.2f} ms | "
        f"{r[k + '_uncached_p50_ms']:.1f} / {r[k + '_uncached_p99_ms']:.1f} ms | "
        f"{r[k + '_cached_p50_ms']:.2f} / {r[k + '_cached_p99_ms']:.2f} ms | "
        f"{r[k + '_cached_rps']:,.0f} |"
        for label, k in (("plain uvicorn (gateway)", "uvicorn"), ("Ray Serve", "serve"))
    ]
    return "\n".join(
        [
            f"### Queries — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: "
            f"{os.cpu_count()} cores",
            "",
            f"Command: `.venv/bin/python scripts/bench_query.py --sites {r['sites']}`. "
            f"Warehouse: {r['sites']:,} sites x 24 hours, {r['rows']:,} (site, minute) rows in "
            f"{SHARDS * 24} Parquet files, built in {r['build_s']:.0f} s; cache: {r['cache']}. "
            "Query: one site's 24-hour minute series (1,440 points). 'At the server' is the "
            "handler's own time from its Server-Timing header; 'seen' adds HTTP, the proxy "
            "and loopback, from a one-connection client.",
            "",
            "| path | at the server, uncached p50 / p99 | at the server, cached p50 / p99 | "
            "seen, uncached p50 / p99 | seen, cached p50 / p99 | cached requests/s "
            "(16 conns) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"uvicorn / Serve requests/s ratio: {ratio:.1f}.",
            "",
            f"After compaction ({r['merged_days']} shard-days merged into one file each, in "
            f"{r['compact_s']:.1f} s), uncached through uvicorn, other sites: at the server "
            f"p50 / p99 {r['merged_uncached_app_p50_ms']:.1f} / "
            f"{r['merged_uncached_app_p99_ms']:.1f} ms (hourly files, same run: "
            f"{r['uvicorn_uncached_app_p50_ms']:.1f} / {r['uvicorn_uncached_app_p99_ms']:.1f} "
            f"ms); seen {r['merged_uncached_p50_ms']:.1f} / {r['merged_uncached_p99_ms']:.1f} ms.",
        ]
    )


if __name__ == "__main__":
    main()
