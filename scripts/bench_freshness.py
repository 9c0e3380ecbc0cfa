#!/usr/bin/env python3
"""Freshness benchmark: time from an event's acknowledgement to its visibility in queries.

    .venv/bin/python scripts/bench_freshness.py [--probes 40] [--timeout 30] [--markdown FILE]

Starts flowray (the ``Flowray`` context manager of bench_ingest.py: 2 groups x 3
replicas, 8 shards, free ports, a temporary data directory) and, while a background
load ingests at the fleet rate (11,600 events/s in batches of 100, open loop,
through the ingest gateway, timestamps "now" over 200 sites), runs probes:

- every ~0.5 s a probe POSTs ONE event (a unique ``id``, ``ts`` = now in epoch ms) for a
  site of its own (``probe-N.example``, a new site per probe, so the expected count is
  exactly 1) through the gateway and notes when the 200 answer (the ack) arrived;
- it then polls ``GET /v1/sites/{site}/traffic?start=<minute of ts>&end=<+1 min>&
  interval=minute`` every 50 ms until that minute's count is 1 (or more: an overcount
  is reported), or until ``--timeout`` seconds pass (a failure);
- latency = arrival of the first answer showing the event - arrival of the ack; it
  includes up to one 50 ms poll interval and one query's time.

Probes run concurrently (one is started every 0.5 s, each polls on its own connection,
one request at a time), in two phases: queries through Ray Serve, then through the
gateway (the same app under plain uvicorn). The target is visibility within
5 s, with points marked ``provisional`` until processed. Until the server has live
counts, events show only after hourly processing, so every probe fails: that is
reported, not hung on. Every phase is bounded (probes x 0.5 s + timeout + a margin).
Prints the markdown to stdout and the raw JSON to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import (  # noqa: E402
    FLEET_BATCH,
    FLEET_EVENTS_S,
    Flowray,
    RawHttp,
    make_events,
    ndjson,
    publish,
)

LOAD_SITES = 200
LOAD_CONNS = 32
PROBE_EVERY_S = 0.5
POLL_EVERY_S = 0.05
REQUEST_TIMEOUT_S = 10.0
WARMUP_S = 3.0
MINUTE_MS = 60_000
NETWORK_ERRORS = (OSError, asyncio.IncompleteReadError, ValueError, IndexError)
REPLACING: set[asyncio.Task[None]] = set()  # connections being reopened after a failure


# ---- HTTP -----------------------------------------------------------------------------
async def request(
    client: RawHttp, method: str, path: str, body: bytes = b"", ctype: str = ""
) -> tuple[int, bytes]:
    """One request on a pooled connection of ``client``; (status, body).

    Unlike ``RawHttp.post`` it returns the body, reads chunked answers too, and never
    loses a slot of the pool: a connection that fails (or is cancelled mid-answer) is
    replaced by a new one, so a timeout cannot starve later requests.
    """
    reader, writer = await client.free.get()
    ok = False
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {client.host}\r\n"
        if method == "POST":
            head += f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        status_line = await reader.readline()
        length, chunked = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            parts = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readline()
            await reader.readline()
            data = b"".join(parts)
        else:
            data = await reader.readexactly(length)
        ok = True
        return int(status_line.split()[1]), data
    finally:
        if ok:
            client.free.put_nowait((reader, writer))
        else:
            writer.close()
            task = asyncio.get_running_loop().create_task(_replace(client))
            REPLACING.add(task)
            task.add_done_callback(REPLACING.discard)


async def _replace(client: RawHttp) -> None:
    """Puts a fresh connection in the pool, retrying for a while if the server is down."""
    for _ in range(50):
        try:
            client.free.put_nowait(await asyncio.open_connection(client.host, client.port))
            return
        except OSError:
            await asyncio.sleep(0.2)


async def timed(
    client: RawHttp, method: str, path: str, body: bytes = b"", ctype: str = ""
) -> tuple[int, bytes]:
    """``request`` bounded by REQUEST_TIMEOUT_S; status 0 for a timeout or network error."""
    try:
        return await asyncio.wait_for(request(client, method, path, body, ctype), REQUEST_TIMEOUT_S)
    except (TimeoutError, *NETWORK_ERRORS):
        return 0, b""


# ---- background load ------------------------------------------------------------------
class Load:
    """Open loop through the gateway: FLEET_EVENTS_S events/s in batches of FLEET_BATCH."""

    def __init__(self, port: int) -> None:
        self.client = RawHttp("127.0.0.1", port, LOAD_CONNS)
        self.stop = asyncio.Event()
        self.acks: list[float] = []
        self.failures = 0
        self.started = self.ended = 0.0

    async def run(self) -> None:
        await self.client.open()
        rate = FLEET_EVENTS_S / FLEET_BATCH
        tasks: set[asyncio.Task[None]] = set()
        self.started = time.perf_counter()
        i = 0
        while not self.stop.is_set():
            delay = self.started + i / rate - time.perf_counter()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            now_ms = int(time.time() * 1000)
            body = ndjson(make_events(FLEET_BATCH, now_ms - 700, sites=LOAD_SITES))
            task = asyncio.create_task(self._one(body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        self.ended = time.perf_counter()
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 1)
        await self.client.close()

    async def _one(self, body: bytes) -> None:
        t = time.perf_counter()
        status, _ = await timed(self.client, "POST", "/v1/events", body, "application/x-ndjson")
        if status == 200:
            self.acks.append((time.perf_counter() - t) * 1000)
        else:
            self.failures += 1

    def summary(self) -> dict[str, Any]:
        acks = sorted(self.acks)
        seconds = max(self.ended - self.started, 1e-9)
        return {
            "target_events_s": FLEET_EVENTS_S,
            "acked_events_s": len(acks) * FLEET_BATCH / seconds,
            "seconds": seconds,
            "requests_acked": len(acks),
            "requests_failed": self.failures,
            "ack_p50_ms": pct(acks, 0.5),
            "ack_p99_ms": pct(acks, 0.99),
        }


# ---- probes ---------------------------------------------------------------------------
async def count_of(client: RawHttp, path: str, timeout_s: float) -> tuple[int, bool | None, str]:
    """(count of the first point or -1, its provisional flag, a note of the answer)."""
    try:
        status, body = await asyncio.wait_for(request(client, "GET", path), timeout_s)
    except (TimeoutError, *NETWORK_ERRORS) as exc:
        return -1, None, f"no answer ({type(exc).__name__})"
    if status != 200:
        return -1, None, f"status {status} {body[:200]!r}"
    try:
        point = orjson.loads(body)["points"][0]
        return int(point["count"]), point.get("provisional"), f"count {int(point['count'])}"
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return -1, None, f"unexpected answer {body[:200]!r}"


async def probe(
    n: int, run_id: str, ingest: RawHttp, query_port: int, timeout_s: float
) -> dict[str, Any]:
    """One event for ``probe-n.example``; polls until its minute counts it."""
    site = f"probe-{n}.example"
    ts = int(time.time() * 1000)
    event = {"id": f"{run_id}-{n}", "ts": ts, "site": site, "path": "/probe"}
    sent = time.perf_counter()
    status, answer = await timed(
        ingest, "POST", "/v1/events", orjson.dumps(event), "application/json"
    )
    acked = time.perf_counter()
    minute = ts - ts % MINUTE_MS
    out: dict[str, Any] = {
        "site": site,
        "path": f"/v1/sites/{site}/traffic?start={minute}&end={minute + MINUTE_MS}&interval=minute",
        "ack_ms": (acked - sent) * 1000,
        "ack_status": status,
    }
    if status != 200:
        return {**out, "outcome": "not_acked", "last": answer[:200].decode("utf-8", "replace")}
    poller = RawHttp("127.0.0.1", query_port, 1)
    try:
        await asyncio.wait_for(poller.open(), REQUEST_TIMEOUT_S)
    except (TimeoutError, OSError):
        return {**out, "outcome": "timeout", "polls": 0, "last": "cannot connect"}
    polls, last, deadline = 0, "", acked + timeout_s
    try:
        while (remaining := deadline - time.perf_counter()) > 0:
            count, provisional, last = await count_of(
                poller, out["path"], min(remaining, REQUEST_TIMEOUT_S)
            )
            seen = time.perf_counter()
            polls += 1
            if count >= 1:
                return {
                    **out,
                    "outcome": "visible" if count == 1 else "overcount",
                    "count": count,
                    "latency_s": seen - acked,
                    "provisional": provisional,
                    "polls": polls,
                }
            await asyncio.sleep(min(POLL_EVERY_S, max(deadline - time.perf_counter(), 0)))
        return {**out, "outcome": "timeout", "polls": polls, "last": last}
    finally:
        await poller.close()


async def recheck(results: list[dict[str, Any]], query_port: int) -> None:
    """Once all probes are done, reads each acknowledged probe's count again.

    A probe stops polling at its first sight; this catches a count that changes
    afterwards (counted twice once processed, or lost).
    """
    client = RawHttp("127.0.0.1", query_port, 1)
    try:
        await asyncio.wait_for(client.open(), REQUEST_TIMEOUT_S)
    except (TimeoutError, OSError):
        return
    try:
        for r in results:
            if r.get("ack_status") == 200:
                r["final_count"], r["final_provisional"], _ = await count_of(
                    client, r["path"], REQUEST_TIMEOUT_S
                )
    finally:
        await client.close()


async def phase(
    fr: Flowray, query_port: int, first: int, probes: int, timeout_s: float, run_id: str
) -> list[dict[str, Any]]:
    """``probes`` probes, one started every PROBE_EVERY_S; all bounded by the timeout."""
    ingest = RawHttp("127.0.0.1", fr.ingest_port, 4)
    await ingest.open()
    tasks = []
    t0 = time.perf_counter()
    for i in range(probes):
        delay = t0 + i * PROBE_EVERY_S - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(probe(first + i, run_id, ingest, query_port, timeout_s)))
    # Each probe ends by itself (ack <= REQUEST_TIMEOUT_S, then <= timeout_s of polls);
    # the margin only guards against a bug, and whatever is left is cancelled.
    done, pending = await asyncio.wait(tasks, timeout=timeout_s + 2 * REQUEST_TIMEOUT_S + 5)
    for task in pending:
        task.cancel()
    results = []
    for i, task in enumerate(tasks):
        if task in done and task.exception() is None:
            results.append(task.result())
        else:
            results.append({"site": f"probe-{first + i}.example", "outcome": "hung"})
    await ingest.close()
    # Bounded: at most one REQUEST_TIMEOUT_S per probe, and only if the server stalls.
    await recheck(results, query_port)
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(r["latency_s"] for r in results if "latency_s" in r)
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    seen = [r for r in results if "latency_s" in r]
    return {
        "probes": len(results),
        "visible": len(lat),
        "failures": len(results) - len(lat),
        "outcomes": outcomes,
        "latency_p50_s": pct(lat, 0.5),
        "latency_p99_s": pct(lat, 0.99),
        "latency_max_s": lat[-1] if lat else None,
        "within_5s": sum(1 for x in lat if x <= 5.0),
        "first_poll": sum(1 for r in seen if r["polls"] == 1),
        "provisional_true": sum(1 for r in seen if r["provisional"] is True),
        "provisional_false": sum(1 for r in seen if r["provisional"] is False),
        "overcount_at_sight": sum(1 for r in seen if r["count"] != 1),
        "final_not_1": sum(1 for r in seen if r.get("final_count", 1) != 1),
        "last_seen_by_failures": sorted(
            {r.get("last", r["outcome"]) for r in results if "latency_s" not in r}
        )[:5],
    }


def pct(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(len(values) * q))] if values else None


async def run(fr: Flowray, probes: int, timeout_s: float) -> dict[str, Any]:
    load = Load(fr.ingest_port)
    load_task = asyncio.create_task(load.run())
    run_id = uuid.uuid4().hex[:12]
    out: dict[str, Any] = {}
    try:
        await asyncio.sleep(WARMUP_S)
        for i, (name, port) in enumerate((("serve", fr.port), ("gateway", fr.ingest_port))):
            raw = await phase(fr, port, i * probes, probes, timeout_s, run_id)
            out[name] = {"summary": summarize(raw), "probes": raw}
    finally:
        load.stop.set()
        try:
            await asyncio.wait_for(load_task, REQUEST_TIMEOUT_S + 5)
        except Exception as exc:  # a broken load is reported, not raised
            out["load_error"] = repr(exc)
        for task in list(REPLACING):
            task.cancel()
    out["load"] = load.summary()
    return out


# ---- report ---------------------------------------------------------------------------
def render(r: dict[str, Any]) -> str:
    def sec(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f} s"

    paths = (("Ray Serve", "serve"), ("gateway (uvicorn)", "gateway"))
    rows = []
    for label, key in paths:
        s = r[key]["summary"]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items()) if k != "visible")
        rows.append(
            f"| {label} | {s['visible']} / {s['probes']} | {sec(s['latency_p50_s'])} | "
            f"{sec(s['latency_p99_s'])} | {sec(s['latency_max_s'])} | {s['within_5s']} | "
            f"{s['failures']}{f' ({kinds})' if s['failures'] else ''} | "
            f"{s['provisional_true']} of {s['visible']} | "
            f"{s['overcount_at_sight']} / {s['final_not_1']} |"
        )
    sums = [r[k]["summary"] for _, k in paths]
    failures = sum(s["failures"] for s in sums)
    probes = sum(s["probes"] for s in sums)
    visible = sum(s["visible"] for s in sums)
    at_sight = sum(s["overcount_at_sight"] for s in sums)
    after = sum(s["final_not_1"] for s in sums)
    worst = max((s["latency_max_s"] or 0.0 for s in sums), default=0.0)
    why = "; ".join(sorted({x for s in sums for x in s["last_seen_by_failures"]})[:3])
    if failures == probes:
        reading = (
            f"No probe became visible within {r['timeout_s']:g} s (last answers: {why}): "
            "the 5 s target is not met — expected while the server has no live counts, "
            "since events then show only after their hour is processed."
        )
    else:
        first = sum(s["first_poll"] for s in sums)
        reading = (
            f"{visible} of {probes} probes became visible, worst {worst:.3f} s "
            f"({'within' if worst <= 5.0 else 'beyond'} the 5 s target); {first} of them at the "
            "first poll, where the latency is only an upper bound (one query's round trip)."
        )
        if failures:
            reading += f" {failures} not visible within {r['timeout_s']:g} s (last: {why})."
    if at_sight or after:
        reading += (
            f" Counted other than once: {at_sight} probes when first seen, {after} on "
            "re-reading after the phase."
        )
    if r.get("load_error"):
        reading += f" The background load failed: {r['load_error']}."
    load = r["load"]
    ack99 = load["ack_p99_ms"]
    return "\n".join(
        [
            f"### Freshness — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: "
            f"{os.cpu_count()} cores",
            "",
            f"Command: `{r['command']}` (load generator and probes on the same cores). "
            f"Background load through the gateway: {load['acked_events_s']:,.0f} events/s "
            f"acknowledged of {FLEET_EVENTS_S:,} targeted (batches of {FLEET_BATCH}, "
            f"{LOAD_SITES} sites, timestamps now, open loop; {load['requests_failed']} failed "
            f"requests; ack p99 {'–' if ack99 is None else f'{ack99:.1f} ms'}). Every "
            f"{PROBE_EVERY_S:g} s a probe POSTs one event for a site of its own through the "
            f"gateway, then polls that minute every {POLL_EVERY_S * 1000:.0f} ms through the "
            "path below; latency = first answer counting it − its ack; not visible within "
            f"{r['timeout_s']:g} s = failure.",
            "",
            "| query path | visible | p50 | p99 | max | within 5 s | failures | "
            "marked provisional | count ≠ 1 at sight / after |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            reading,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=40, help="probes per query path")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before a probe is a failure"
    )
    parser.add_argument("--markdown", type=Path, help="append the results to this file")
    args = parser.parse_args()
    command = ".venv/bin/python scripts/bench_freshness.py " + " ".join(sys.argv[1:])
    results: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}",
        "command": command.strip(),
        "probes_per_path": args.probes,
        "timeout_s": args.timeout,
    }
    with Flowray() as fr:
        results.update(asyncio.run(run(fr, args.probes, args.timeout)))
    publish(render(results), results, args.markdown)


if __name__ == "__main__":
    main()
