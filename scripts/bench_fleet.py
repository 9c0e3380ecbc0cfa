#!/usr/bin/env python3
"""Acknowledgement latency at a fleet rate, open loop, beside the client's own floor.

    .venv/bin/python scripts/bench_fleet.py [--rate 115741] [--batch 100] [--seconds 20]
        [--rounds 2] [--conns 128]

A fresh local cluster (`flowray up`: 2 groups x 3 replicas, 8 shards, fsync before
every acknowledgement, live counts and the processing cycle running) takes NDJSON
requests of --batch events stamped now, sent on a fixed schedule (--rate events/s)
over persistent connections. Each request's latency counts from the time it was
scheduled, not from when a connection was free to send it, so a stall shows as the
queue behind it (no coordinated omission). In the same run, the same client sends
the same schedule to a trivial HTTP server (uvicorn, answering 200 at once): the
floor the client and the shared cores allow. 115,741 events/s is ten billion a day.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import Flowray, RawHttp, free_port, make_events, ndjson  # noqa: E402

TEN_BILLION_A_DAY = 115_741
BODIES = 64  # distinct bodies sent in turn
TRIVIAL_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})
"""


async def open_loop(port: int, rate: float, batch: int, seconds: float, conns: int) -> dict:
    """Send rate/batch requests a second for ``seconds``; each latency from its
    scheduled time. Percentiles in ms, and the requests that failed."""
    now_ms = int(time.time() * 1000)
    bodies = [ndjson(make_events(batch, now_ms - 60_000 + i * 500)) for i in range(BODIES)]
    client = RawHttp("127.0.0.1", port, conns)
    await client.open()
    per_s = rate / batch
    total = int(per_s * seconds)
    latencies: list[float] = []
    failures = 0

    async def one(i: int, scheduled: float) -> None:
        nonlocal failures
        try:
            status = await client.post("/v1/events", bodies[i % BODIES], "application/x-ndjson")
        except (OSError, asyncio.IncompleteReadError, ValueError):
            failures += 1
            return
        if status != 200:
            failures += 1
            return
        latencies.append((time.perf_counter() - scheduled) * 1000)

    tasks = []
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = t0 + i / per_s
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 120)
    await client.close()
    latencies.sort()
    n = len(latencies)
    if not n:
        return {"requests": 0, "failures": failures}

    def at(q: float) -> float:
        return latencies[min(n - 1, int(n * q))]

    return {
        "requests": n,
        "failures": failures,
        "p50": at(0.5),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": latencies[-1],
    }


class TrivialServer:
    """uvicorn serving TRIVIAL_APP in a child process, on a port of its own."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        (workdir / "trivial_app.py").write_text(TRIVIAL_APP)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "trivial_app:app",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=workdir,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        sys.exit("the trivial server did not start within 30 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def row(label: str, r: dict) -> str:
    if not r.get("requests"):
        return f"| {label} | 0 | {r['failures']} | - | - | - | - |"
    return (
        f"| {label} | {r['requests']:,} | {r['failures']} | {r['p50']:.1f} | {r['p99']:.1f}"
        f" | {r['p999']:.1f} | {r['max']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=TEN_BILLION_A_DAY, help="events/s")
    parser.add_argument("--batch", type=int, default=100, help="events a request")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conns", type=int, default=128, help="persistent connections")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: "
        f"{os.cpu_count()} cores; {args.rate:,.0f} events/s in requests of {args.batch} "
        f"({args.rate / args.batch:,.0f} requests/s), {args.seconds:.0f} s a measurement, "
        f"{args.conns} connections; latency in ms from each request's scheduled time.",
        "",
        "| target | requests | failed | p50 | p99 | p999 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    with Flowray() as fr:
        trivial = TrivialServer(fr.dir)
        try:
            time.sleep(2)
            port = int(fr.ingest.rsplit(":", 1)[1])
            for n in range(1, args.rounds + 1):
                for label, target in (("trivial server", trivial.port), ("flowray", port)):
                    r = asyncio.run(
                        open_loop(target, args.rate, args.batch, args.seconds, args.conns)
                    )
                    lines.append(row(f"{label}, round {n}", r))
                    print(lines[-1], flush=True)
        finally:
            trivial.stop()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
