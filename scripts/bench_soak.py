#!/usr/bin/env python3
"""Memory of every flowray process under minutes of batched HTTP ingest.

    .venv/bin/python scripts/bench_soak.py [--minutes 6] [--conns 4] [--fleet]

A detached local cluster (`flowray up`: 2 groups x 3 replicas, 8 shards, two ingest
gateways) takes wrk's batched requests (10,000 seed lines, or 10,000 NDJSON events,
alternating minute by minute) without a pause. After each minute it reports the
resident memory (RSS) and proportional set size (PSS) of each gateway, replica and
the processor, found by their process titles in the cluster's session. Memory is
flat when later minutes add (next to) nothing. With --fleet the load is the
fleet rate instead (11,600 events/s in requests of 100, open loop, with each
minute's ack p50/p99): many small log entries, for long runs on little disk. Their
events are stamped as they are sent, as a tracker's are (within the last minute:
64 bodies are made per minute and sent in turn); with --late, they all fall in one
minute of an hour already over.
scripts/bench_memory.py measures the
replicas over hours of data through the in-process ingest path instead; this one
covers the gateways, which parse every request.

Disk: the raw log is kept, about 11 bytes a seed-line event on each of six
replicas; a minute at 1.3 M events/s writes about 5 GB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import (  # noqa: E402
    Flowray,
    fleet_latency,
    make_events,
    ndjson,
    seed_lines,
    wrk,
)
from bench_memory import _kib  # noqa: E402

KINDS = (b"ray::Gateway", b"ray::Replica", b"ray::Processor")


def processes(session: int) -> list[tuple[str, int, int]]:
    """(kind and pid, RSS MiB, PSS MiB) of the cluster's gateways, replicas, processor."""
    out = []
    for stat in sorted(Path("/proc").glob("[0-9]*/stat")):
        pid = int(stat.parent.name)
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) != session:
                continue
            kind = (stat.parent / "cmdline").read_bytes().split(b"\0")[0]
            if kind not in KINDS:
                continue
            rss = _kib(pid, "status", "VmRSS:") // 1024
            pss = _kib(pid, "smaps_rollup", "Pss:") // 1024
        except (OSError, IndexError, ValueError):
            continue
        out.append((f"{kind.decode()[5:].lower()} {pid}", rss, pss))
    return sorted(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=6)
    parser.add_argument("--conns", type=int, default=4)
    parser.add_argument("--fleet", action="store_true", help="the fleet rate, not wrk")
    parser.add_argument(
        "--late",
        action="store_true",
        help="with --fleet: every event in one minute of an hour already over (each "
        "processing cycle then re-publishes that hour), not at the time it is sent",
    )
    args = parser.parse_args()
    start_ms = int(time.time() * 1000) - 3_600_000
    batch = make_events(10_000, start_ms)
    bodies = [
        ("/v1/logs", seed_lines(batch), "text/plain", "seed lines"),
        ("/v1/events", ndjson(batch), "application/x-ndjson", "NDJSON"),
    ]
    rows: list[tuple[str, str, list[tuple[str, int, int]]]] = []
    with Flowray() as fr:
        session = int(json.loads((fr.dir / "data" / "cluster.json").read_text())["pid"])
        time.sleep(2)
        rows.append(("start", "", processes(session)))
        for minute in range(args.minutes):
            if args.fleet:
                sent_ms = start_ms if args.late else int(time.time() * 1000) - 64_000
                acks = asyncio.run(fleet_latency(fr.ingest, 60, sent_ms))
                rate = f"fleet: ack p50 {acks['p50_ms']:.1f} / p99 {acks['p99_ms']:.1f} ms"
                if acks["failures"]:
                    rate += f", {acks['failures']:.0f} failed"
            else:
                path, body, ctype, name = bodies[minute % 2]
                result = wrk(f"{fr.ingest}{path}", body, ctype, 60, args.conns)
                rate = f"{name}: {result['rps'] * len(batch) / 1e6:.2f} M events/s"
                if result["errors"]:
                    rate += f", {result['errors']:.0f} non-2xx"
            rows.append((f"after minute {minute + 1}", rate, processes(session)))
            print(rows[-1], file=sys.stderr, flush=True)
    names = [name.split()[0] for name, _r, _p in rows[0][2]]
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: "
        f"{os.cpu_count()} cores; "
        + (
            f"the fleet rate{', late events' if args.late else ''}"
            if args.fleet
            else f"wrk with {args.conns} connections"
        )
        + "; RSS / PSS in MiB.",
        "",
        "| when | load | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for when, load, mem in rows:
        lines.append(f"| {when} | {load} | " + " | ".join(f"{r} / {p}" for _n, r, p in mem) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
