#!/usr/bin/env python3
"""Ingest benchmark: flowray beside its baselines, measured in one run on one machine.

    .venv/bin/python scripts/bench_ingest.py [--seconds 10] [--markdown FILE]

Measures, each on this machine in this run:
- raw append + fsync of the same bytes (one file, and three files in turn as three
  replicas on one disk would do): what the disk allows;
- flowray batched ingest (NDJSON bodies of 1,000 and 10,000 events, of 1,000 and
  5,000 events with ids, a JSON array of 1,000, seed lines) and
  single-event requests through the ingest gateway, with wrk, every answer after a
  majority fsync in 3-replica groups;
- acknowledgement latency p50/p99 at the fleet rate (11,600 events/s in
  batches of 100, sent open-loop);
- write unavailability after kill -9 of a group's master;
- NATS JetStream with 3 replicas (three nats-server processes on loopback, file
  storage, no per-message fsync): batched (one 1,000-event message) and single events.
The load generators share the machine's cores with the system they measure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
FLOWRAY = [sys.executable, "-m", "flowray"]
FLEET_EVENTS_S = 11_600
FLEET_BATCH = 100


def free_port() -> int:
    """A port outside the ephemeral range (see tests/ports.py)."""
    sys.path.insert(0, str(ROOT))
    from tests.ports import free_port as pick

    return pick()


def publish(report: str, results: dict[str, Any], markdown: Path | None) -> None:
    """A benchmark's report on stdout (and appended to ``markdown``), its raw figures
    as JSON on stderr."""
    print(report)
    print(json.dumps(results, indent=2), file=sys.stderr)
    if markdown:
        with open(markdown, "a") as fh:
            fh.write(report + "\n")


def ensure_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if path:
        return path
    for command in (["apt-get", "install", "-y", "-qq", package], ["apt-get", "update", "-qq"]):
        subprocess.run(command, check=False, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False, capture_output=True)
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if not path:
        sys.exit(f"{name} is needed (Debian package {package})")
    return path


def make_events(n: int, start_ms: int, sites: int = 500, ids: bool = False) -> list[dict[str, Any]]:
    """With ``ids`` every event has an id with the marker ID_MARK in it, which wrk()
    replaces with the request's number: ids unique across requests."""
    events: list[dict[str, Any]] = [
        {"ts": start_ms + i * 7, "site": f"site{i % sites}.example.com", "path": "/p"}
        for i in range(n)
    ]
    if ids:
        for i, event in enumerate(events):
            event["id"] = f"r{ID_MARK}-{i}"
    return events


USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
]


def with_fields(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same events with every field a tracker sends: a path with UTM parameters, a
    referrer, a User-Agent, a visitor id, and now and then a custom event name."""
    return [
        {
            **e,
            "path": f"/products/{i % 97}?utm_source=news&utm_medium=email",
            "referrer": "https://www.google.com/search?q=shoes",
            "ua": USER_AGENTS[i % len(USER_AGENTS)],
            "visitor": f"{(i * 2654435761) % 2**64:016x}",
            **({"name": "Signup"} if i % 20 == 0 else {}),
        }
        for i, e in enumerate(events)
    ]


def fields_ratio(ingest: str, start_ms: int, seconds: float, rounds: int) -> None:
    """Ingest with every field against count-only bodies of the same sizes, alternating
    on one cluster, and print each pair's events/s and ratio."""
    url = f"{ingest}/v1/events"
    sizes = [(1000, 16, "NDJSON 1k"), (10_000, 8, "NDJSON 10k"), (1, 64, "single")]
    for n, conns, label in sizes:
        plain = make_events(n, start_ms)
        for e in plain:
            e.pop("path", None)
        bodies = {"count-only": ndjson(plain), "all fields": ndjson(with_fields(plain))}
        for round_ in range(rounds):
            rates = {
                kind: wrk(url, body, "application/x-ndjson", seconds, conns)["rps"] * n
                for kind, body in bodies.items()
            }
            ratio = rates["all fields"] / rates["count-only"]
            print(
                f"{label} round {round_ + 1}: count-only {rates['count-only']:,.0f} events/s, "
                f"all fields {rates['all fields']:,.0f} events/s, ratio {ratio:.2f}",
                flush=True,
            )


def ndjson(events: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(e) for e in events)


def seed_lines(events: list[dict[str, Any]]) -> bytes:
    out = []
    for e in events:
        t = datetime.fromtimestamp(e["ts"] / 1000, tz=UTC)
        out.append(f"{t:%Y.%m.%d %H:%M:%S}.{e['ts'] % 1000:03d} {e['site']}")
    return "\n".join(out).encode()


# ---- raw disk baseline ----------------------------------------------------------------
def raw_fsync(payload: bytes, seconds: float, files: int) -> float:
    """Appends of ``payload`` + fsync per append per file; returns appends/s."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-fsync-", dir=ROOT))
    fds = [os.open(tmp / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND) for i in range(files)]
    n, deadline = 0, time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        for fd in fds:
            os.write(fd, payload)
            os.fsync(fd)
        n += 1
    rate = n / (time.monotonic() - start)
    for fd in fds:
        os.close(fd)
    shutil.rmtree(tmp)
    return rate


# ---- wrk ------------------------------------------------------------------------------
LUA = """
wrk.method = "POST"
local f = io.open(os.getenv("BODY"), "rb"); wrk.body = f:read("*all"); f:close()
wrk.headers["Content-Type"] = os.getenv("CTYPE")
"""
# A body with ID_MARK in it: each request replaces the marks with its own number.
ID_MARK = "@@"
LUA_IDS = """
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CTYPE")
local f = io.open(os.getenv("BODY"), "rb"); local template = f:read("*all"); f:close()
local parts = {}
for piece in (template .. "@@"):gmatch("(.-)@@") do parts[#parts + 1] = piece end
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, table.concat(parts, tostring(n)))
end
"""


def wrk(url: str, body: bytes, ctype: str, seconds: float, conns: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-wrk-"))
    (tmp / "post.lua").write_text(LUA_IDS if ID_MARK.encode() in body else LUA)
    (tmp / "body").write_bytes(body)
    env = dict(os.environ, BODY=str(tmp / "body"), CTYPE=ctype)
    out = subprocess.run(
        [
            ensure_tool("wrk", "wrk"),
            "-t1",
            f"-c{conns}",
            f"-d{int(seconds)}s",
            "--latency",
            "-s",
            str(tmp / "post.lua"),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    shutil.rmtree(tmp)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = 0.0
    if p99:
        p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {"rps": rps, "errors": float(non2xx.group(1)) if non2xx else 0.0, "p99_ms": p99_ms}


# ---- flowray cluster ------------------------------------------------------------------
class Flowray:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-flowray-", dir=ROOT))
        self.port, self.ingest_port = free_port(), free_port()
        self.env = dict(os.environ, FLOWRAY_DATA_DIR=str(self.dir / "data"), FLOWRAY_REDIS_URL="")
        self.env.pop("RAY_ADDRESS", None)

    def __enter__(self) -> Flowray:
        result = subprocess.run(
            [
                *FLOWRAY,
                "up",
                "--detach",
                "--port",
                str(self.port),
                "--ingest-port",
                str(self.ingest_port),
                "--groups",
                "2",
                "--replicas",
                "3",
                "--shards",
                "8",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            sys.exit(f"flowray up failed: {result.stdout}{result.stderr}")
        return self

    def __exit__(self, *_: object) -> None:
        subprocess.run([*FLOWRAY, "down"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def ingest(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    def rss_mib(self) -> float:
        """Resident memory of every process of this cluster (its whole session)."""
        record = json.loads((self.dir / "data" / "cluster.json").read_text())
        sid, total = int(record["pid"]), 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[3]) != sid:
                    continue
                status = (stat.parent / "status").read_text()
            except (OSError, IndexError, ValueError):
                continue
            match = re.search(r"VmRSS:\s+(\d+) kB", status)
            total += int(match.group(1)) if match else 0
        return total / 1024

    def master_pid(self, group: int, wait_s: float = 30.0) -> int:
        """The pid of the group's master. A replica too busy to answer the status call
        in time shows as down (after the throughput runs, processing loads them):
        ask again, for up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            status = httpx.get(f"{self.ingest}/v1/admin/status", timeout=30).json()
            replicas = status["groups"][group]["replicas"]
            for r in replicas:
                if r.get("role") == "master":
                    return int(r["pid"])
            if time.monotonic() > deadline:
                raise LookupError(f"no master in group {group}: {replicas}")
            print(f"no master in group {group} yet: {replicas}", file=sys.stderr)
            time.sleep(0.5)


class RawHttp:
    """A minimal HTTP/1.1 client over persistent asyncio connections.

    httpx spends milliseconds of CPU per request, which on two shared cores becomes
    the bottleneck of an open-loop latency test; this client spends tens of µs.
    """

    def __init__(self, host: str, port: int, conns: int) -> None:
        self.host, self.port, self.conns = host, port, conns
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def open(self) -> None:
        for _ in range(self.conns):
            self.free.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def post(self, path: str, body: bytes, ctype: str) -> int:
        reader, writer = await self.free.get()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        writer.write(head + body)
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        self.free.put_nowait((reader, writer))
        return int(status_line.split()[1])

    async def close(self) -> None:
        while not self.free.empty():
            _r, w = self.free.get_nowait()
            w.close()


async def fleet_latency(url: str, seconds: float, start_ms: int) -> dict[str, float]:
    """Open loop: 116 requests/s of 100 events; latency of each acknowledgement."""
    rate = FLEET_EVENTS_S / FLEET_BATCH
    port = int(url.rsplit(":", 1)[1])
    bodies = [ndjson(make_events(FLEET_BATCH, start_ms + i * 1000)) for i in range(64)]
    client = RawHttp("127.0.0.1", port, 64)
    await client.open()
    latencies: list[float] = []
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        t = time.perf_counter()
        try:
            status = await client.post(
                "/v1/events", bodies[i % len(bodies)], "application/x-ndjson"
            )
        except (OSError, asyncio.IncompleteReadError, ValueError):
            failures += 1
            return
        if status == 200:
            latencies.append((time.perf_counter() - t) * 1000)
        else:
            failures += 1

    tasks = []
    t0 = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    await client.close()
    latencies.sort()
    n = len(latencies)
    return {
        "p50_ms": latencies[n // 2],
        "p90_ms": latencies[int(n * 0.9)],
        "p99_ms": latencies[int(n * 0.99)],
        "p999_ms": latencies[int(n * 0.999)],
        "max_ms": latencies[-1],
        "requests": float(len(latencies)),
        "failures": float(failures),
    }


class _KillProbe(threading.Thread):
    """Writes a batch every 5 ms; notes the first acknowledgement of a batch sent after
    the kill (one sent before may have committed before it, answered just after)."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.stop = threading.Event()
        self.killed_at = 0.0
        self.acked_after = 0.0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                sent_at = time.monotonic()
                try:
                    ok = (
                        client.post(
                            "/v1/events",
                            content=self.body,
                            headers={"Content-Type": "application/x-ndjson"},
                        ).status_code
                        == 200
                    )
                except httpx.HTTPError:
                    ok = False
                if ok and 0 < self.killed_at < sent_at and not self.acked_after:
                    self.acked_after = time.monotonic()
                time.sleep(0.005)


def _unavailability(
    fr: Flowray, start_ms: int, tries: int, fault: Any, held_s: float = 0.0
) -> list[float]:
    """Seconds from ``fault(pid)`` on group 0's master to the next acknowledged write;
    ``fault`` returns what ends it (or None), called ``held_s`` after it began."""
    gaps = []
    body = ndjson(make_events(FLEET_BATCH, start_ms))
    for _ in range(tries):
        time.sleep(3)
        pid = fr.master_pid(0)
        probe = _KillProbe(fr.ingest, body)
        probe.start()
        time.sleep(1)
        probe.killed_at = time.monotonic()
        end = fault(pid)
        try:
            deadline = probe.killed_at + 30
            while not probe.acked_after and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(max(0.0, probe.killed_at + held_s - time.monotonic()))
        finally:
            if end is not None:
                end()
        probe.stop.set()
        probe.join(timeout=15)
        gaps.append(probe.acked_after - probe.killed_at if probe.acked_after else float("inf"))
    return gaps


def unavailability_after_master_kill(fr: Flowray, start_ms: int, tries: int = 3) -> list[float]:
    """Seconds from kill -9 of group 0's master to the next acknowledged write."""
    return _unavailability(fr, start_ms, tries, lambda pid: os.kill(pid, signal.SIGKILL))


def unavailability_after_master_pause(
    fr: Flowray, start_ms: int, tries: int = 3, pause_s: float = 6.0
) -> list[float]:
    """Seconds from SIGSTOP of group 0's master to the next acknowledged write; the
    master is continued after ``pause_s`` (it then steps down and catches up)."""

    def stop(pid: int) -> Any:
        os.kill(pid, signal.SIGSTOP)
        return lambda: os.kill(pid, signal.SIGCONT)

    return _unavailability(fr, start_ms, tries, stop, held_s=pause_s)


# ---- NATS JetStream -------------------------------------------------------------------
class Nats:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-nats-", dir=ROOT))
        self.ports = [free_port() for _ in range(3)]
        self.routes = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Nats:
        binary = ensure_tool("nats-server", "nats-server")
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)
        for i in range(3):
            self.procs.append(
                subprocess.Popen(
                    [
                        binary,
                        "-a",
                        "127.0.0.1",
                        "-p",
                        str(self.ports[i]),
                        "-js",
                        "-sd",
                        str(self.dir / f"n{i}"),
                        "--name",
                        f"n{i}",
                        "--cluster_name",
                        "bench",
                        "--cluster",
                        f"nats://127.0.0.1:{self.routes[i]}",
                        "--routes",
                        routes,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(3)
        return self

    def __exit__(self, *_: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)

    async def publish_rate(self, payload: bytes, seconds: float, window: int) -> float:
        import nats

        nc = await nats.connect(f"nats://127.0.0.1:{self.ports[0]}")
        js = nc.jetstream()
        name = f"S{int(time.time() * 1000)}"
        for _ in range(50):
            try:
                await js.add_stream(
                    name=name, subjects=[f"{name}.ev"], num_replicas=3, storage="file"
                )
                break
            except Exception:  # cluster still forming
                await asyncio.sleep(0.2)
        sent, deadline = 0, time.monotonic() + seconds
        start = time.monotonic()
        pending: set[asyncio.Future[Any]] = set()
        while time.monotonic() < deadline:
            pending.add(asyncio.ensure_future(js.publish(f"{name}.ev", payload)))
            if len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                sent += sum(1 for d in done if d.exception() is None)
        if pending:  # all of the last window may have completed already
            done, _ = await asyncio.wait(pending)
            sent += sum(1 for d in done if d.exception() is None)
        rate = sent / (time.monotonic() - start)
        await nc.close()
        return rate


# ---- main -----------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--markdown", type=Path, help="append the results to this file")
    parser.add_argument(
        "--kills-only",
        type=int,
        metavar="N",
        help="only kill -9 group 0's master N times on an idle cluster; print the seconds "
        "from each kill to the next acknowledged write",
    )
    parser.add_argument(
        "--pauses-only",
        type=int,
        metavar="N",
        help="only SIGSTOP group 0's master for 6 s, N times on an idle cluster; print the "
        "seconds from each stop to the next acknowledged write",
    )
    parser.add_argument(
        "--fields-only",
        type=int,
        metavar="N",
        help="only compare bodies with every field against count-only bodies of the same "
        "sizes, N alternating rounds on one fresh cluster; print each pair's ratio",
    )
    parser.add_argument(
        "--fleet-only",
        type=int,
        metavar="N",
        help="only measure the ack latency at the fleet rate, N rounds of 2 x --seconds "
        "on one fresh cluster; print each round's percentiles",
    )
    args = parser.parse_args()
    s = args.seconds
    start_ms = int(time.time() * 1000) - 3 * 3_600_000
    if args.fleet_only:
        with Flowray() as fr:
            time.sleep(2)
            for _ in range(args.fleet_only):
                r = asyncio.run(fleet_latency(fr.ingest, 2 * s, start_ms))
                print(" ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
        return
    if args.fields_only:
        with Flowray() as fr:
            time.sleep(2)
            fields_ratio(fr.ingest, start_ms, s, args.fields_only)
        return
    if args.pauses_only:
        with Flowray() as fr:
            time.sleep(2)
            gaps = unavailability_after_master_pause(fr, start_ms, tries=args.pauses_only)
        print("writes unavailable after SIGSTOP of a master (s):", *(f"{g:.2f}" for g in gaps))
        return
    if args.kills_only:
        with Flowray() as fr:
            time.sleep(2)
            gaps = unavailability_after_master_kill(fr, start_ms, tries=args.kills_only)
        print("writes unavailable after kill -9 of a master (s):", *(f"{g:.2f}" for g in gaps))
        return
    batch1k, batch10k = make_events(1000, start_ms), make_events(10_000, start_ms)
    batch1k_ids = make_events(1000, start_ms, ids=True)
    results: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}",
        "seconds": s,
    }

    from flowray.ingest.events import Limits, parse_ndjson_body
    from flowray.ingest.pieces import to_ipc

    payload = to_ipc(parse_ndjson_body(ndjson(batch1k), Limits(now_ms=start_ms + 10**8)))
    results["raw_fsync_1file_batches_s"] = raw_fsync(payload, s / 2, 1)
    results["raw_fsync_3files_batches_s"] = raw_fsync(payload, s / 2, 3)
    results["payload_bytes_per_1k_batch"] = len(payload)

    with Flowray() as fr:
        url = f"{fr.ingest}/v1/events"
        time.sleep(2)
        results["rss_mib_start"] = fr.rss_mib()
        # First, on the fresh cluster: the throughput runs below leave millions of
        # events whose blocks are sealed and processed seconds later, and processing
        # them would share the two cores with this run (in steady state an hour's
        # processing takes seconds of each hour).
        results["fleet_latency"] = asyncio.run(fleet_latency(fr.ingest, 2 * s, start_ms))
        results["rss_mib_after_fleet"] = fr.rss_mib()
        results["flowray_ndjson_1k"] = wrk(url, ndjson(batch1k), "application/x-ndjson", s, 16)
        results["flowray_json_1k"] = wrk(url, orjson.dumps(batch1k), "application/json", s, 16)
        results["rss_mib_before_ids"] = fr.rss_mib()
        results["flowray_ndjson_1k_ids"] = wrk(
            url, ndjson(batch1k_ids), "application/x-ndjson", s, 16
        )
        results["rss_mib_after_ids"] = fr.rss_mib()  # the masters hold the ids seen
        results["flowray_ndjson_5k_ids"] = wrk(  # flowray ingest's requests
            url, ndjson(make_events(5000, start_ms, ids=True)), "application/x-ndjson", s, 8
        )
        results["flowray_ndjson_10k"] = wrk(url, ndjson(batch10k), "application/x-ndjson", s, 8)
        results["flowray_seed_10k"] = wrk(
            f"{fr.ingest}/v1/logs", seed_lines(batch10k), "text/plain", s, 8
        )
        one = orjson.dumps({"site": "site1.example.com", "path": "/"})
        results["flowray_single"] = wrk(url, one, "application/json", s, 64)
        results["flowray_serve_single"] = wrk(
            f"http://127.0.0.1:{fr.port}/v1/events", one, "application/json", s, 64
        )
        results["rss_mib_after_load"] = fr.rss_mib()
        results["master_kill_unavailable_s"] = unavailability_after_master_kill(fr, start_ms)
        results["master_pause_unavailable_s"] = unavailability_after_master_pause(fr, start_ms)

    with Nats() as nt:
        results["nats_batch_1k_msgs_s"] = asyncio.run(nt.publish_rate(payload, s, 64))
        results["nats_single_msgs_s"] = asyncio.run(
            nt.publish_rate(orjson.dumps(batch1k[0]), s, 256)
        )

    publish(render(results), results, args.markdown)


def render(r: dict[str, Any]) -> str:
    def ev(rps: float, n: int) -> str:
        return f"{rps * n:,.0f} events/s ({rps:,.1f} req/s)"

    raw1, raw3 = r["raw_fsync_1file_batches_s"], r["raw_fsync_3files_batches_s"]
    id_events = max(1.0, r["flowray_ndjson_1k_ids"]["rps"] * 1000 * int(r["seconds"]))
    id_bytes = (r["rss_mib_after_ids"] - r["rss_mib_before_ids"]) * 2**20 / id_events
    lines = [
        f"### Ingest — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {r['machine']}",
        "",
        "Command: `.venv/bin/python scripts/bench_ingest.py --seconds "
        f"{r['seconds']:g}` (load generators on the same 2 cores).",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| raw append+fsync, 1 file, 1k-event batches ({r['payload_bytes_per_1k_batch']:,} B) "
        f"| {raw1 * 1000:,.0f} events/s ({raw1:,.0f} fsyncs/s) |",
        f"| raw append+fsync, 3 files in turn | {raw3 * 1000:,.0f} events/s |",
        f"| flowray NDJSON, 1,000 events/request | {ev(r['flowray_ndjson_1k']['rps'], 1000)} |",
        f"| flowray JSON array, 1,000 events/request | {ev(r['flowray_json_1k']['rps'], 1000)} |",
        f"| flowray NDJSON, 1,000 events/request, each with a unique id | "
        f"{ev(r['flowray_ndjson_1k_ids']['rps'], 1000)} |",
        f"| memory of all cluster processes before / after the run with ids | "
        f"{r['rss_mib_before_ids']:,.0f} / {r['rss_mib_after_ids']:,.0f} MiB "
        f"({id_bytes:,.0f} B an event) |",
        f"| flowray NDJSON, 5,000 events/request, each with a unique id (`flowray ingest`'s "
        f"requests) | {ev(r['flowray_ndjson_5k_ids']['rps'], 5000)} |",
        f"| flowray NDJSON, 10,000 events/request | {ev(r['flowray_ndjson_10k']['rps'], 10_000)} |",
        f"| flowray seed lines, 10,000 events/request | "
        f"{ev(r['flowray_seed_10k']['rps'], 10_000)} |",
        f"| flowray single-event requests (gateway) | {r['flowray_single']['rps']:,.0f} req/s, "
        f"p99 {r['flowray_single']['p99_ms']:.0f} ms |",
        f"| flowray single-event requests (Ray Serve) | "
        f"{r['flowray_serve_single']['rps']:,.0f} req/s |",
        f"| ack latency at 11,600 events/s in batches of 100 (first, on the fresh cluster) | "
        f"p50 {r['fleet_latency']['p50_ms']:.1f} ms, p99 {r['fleet_latency']['p99_ms']:.1f} ms "
        f"({r['fleet_latency']['failures']:.0f} failures) |",
        "| writes unavailable after kill -9 of a master | "
        + ", ".join(f"{g:.2f} s" for g in r["master_kill_unavailable_s"])
        + " |",
        "| writes unavailable after SIGSTOP of a master (6 s) | "
        + ", ".join(f"{g:.2f} s" for g in r["master_pause_unavailable_s"])
        + " |",
        f"| memory of all cluster processes: start / after the fleet-rate run / after the "
        f"throughput runs | {r['rss_mib_start']:,.0f} / {r['rss_mib_after_fleet']:,.0f} / "
        f"{r['rss_mib_after_load']:,.0f} MiB |",
        f"| NATS JetStream R3, 1k-event messages | {r['nats_batch_1k_msgs_s'] * 1000:,.0f} "
        f"events/s ({r['nats_batch_1k_msgs_s']:,.0f} msgs/s) |",
        f"| NATS JetStream R3, one event per message | {r['nats_single_msgs_s']:,.0f} msgs/s |",
        "",
        f"Ratios: flowray 10k-NDJSON / NATS batched = "
        f"{r['flowray_ndjson_10k']['rps'] * 10 / max(r['nats_batch_1k_msgs_s'], 1):.2f}; "
        f"flowray single / NATS single = "
        f"{r['flowray_single']['rps'] / max(r['nats_single_msgs_s'], 1):.2f}; "
        f"flowray 10k-NDJSON / raw fsync (3 files) = "
        f"{r['flowray_ndjson_10k']['rps'] * 10 / max(raw3, 1):.3f}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
