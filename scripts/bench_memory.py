#!/usr/bin/env python3
"""Memory under sustained load: hour after hour of ingest and processing.

    .venv/bin/python scripts/bench_memory.py [--hours 4] [--events 10000000]

A local cluster (2 groups x 3 replicas, 8 shards) takes --events events per hour,
committed through the API's ingest path (majority fsync), then processes and publishes
the hour, --hours times over. After each hour it reports every replica's resident
memory (RSS) and proportional set size (PSS: pages shared with the object store and
other processes counted once), and the whole Ray session's PSS. Memory is flat when
the later hours add (next to) nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_process import (  # noqa: E402
    HOUR_MS,
    bench_settings,
    ingest_hour,
    pss_mib,
    site_names,
)

from flowray.cluster import control as cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _kib(pid: int, path: str, field: str) -> int:
    for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def replica_memory(running: cluster.Cluster) -> list[tuple[str, int, int]]:
    """(replica, RSS MiB, PSS MiB) of every replica."""
    out = []
    for (g, r), handle in sorted(running.replicas.items()):
        st = ray.get(handle.status.remote(), timeout=30)
        name = f"g{g}r{r}" + ("*" if st["role"] == "master" else "")
        pid = int(st["pid"])
        rss = _kib(pid, "status", "VmRSS:") // 1024
        pss = _kib(pid, "smaps_rollup", "Pss:") // 1024
        out.append((name, rss, pss))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=int, default=4)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--sites", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=ROOT))
    settings = bench_settings(work, "flowray-bench-memory")
    lines = []
    try:
        running = cluster.start(settings, serve_app=False)
        settings = running.settings
        names = site_names(args.sites)
        first = (int(time.time() * 1000) // HOUR_MS - 24 * 7) * HOUR_MS
        rows = [("start", replica_memory(running), pss_mib(os.getpid()))]
        for hour in range(args.hours):
            text, raw = work / "hour.log", work / "hour.parquet"
            asyncio.run(
                ingest_hour(settings, first + hour * HOUR_MS, args.events, names, text, raw)
            )
            ray.get(running.processor.run.remote("closed"), timeout=3600)
            text.unlink()
            raw.unlink()
            time.sleep(2)
            rows.append((f"after hour {hour + 1}", replica_memory(running), pss_mib(os.getpid())))
            print(rows[-1], file=sys.stderr, flush=True)
        cluster.stop(running, serve_app=False)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    header = [name for name, _r, _p in rows[0][1]]
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: "
        f"{os.cpu_count()} cores; {args.events:,} events per hour, {args.sites:,} sites; "
        "replica RSS / PSS in MiB (* = master), and the PSS of the whole Ray session.",
        "",
        "| when | " + " | ".join(header) + " | session PSS |",
        "|---|" + "---|" * (len(header) + 1),
    ]
    for when, mem, session in rows:
        cells = " | ".join(f"{rss} / {pss}" for _n, rss, pss in mem)
        lines.append(f"| {when} | {cells} | {session:,.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
