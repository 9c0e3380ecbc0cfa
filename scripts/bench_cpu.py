"""CPU per ingest request, by process role: where a write's cost goes.

Brings up a fresh cluster (2 groups x 3 replicas, 8 shards, as bench_ingest.py), then
for each round drives the gateway with wrk for --seconds and reads the CPU time
(utime + stime, /proc/PID/stat) of every process of the cluster before and after.
Prints requests/s and CPU milliseconds per request for gateways, masters, followers,
the processor and the rest of Ray. Throughput on shared cores drifts from minute to
minute; CPU per request drifts much less, so A/B two checkouts with it.

    .venv/bin/python scripts/bench_cpu.py --body ndjson1k --rounds 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import Flowray, make_events, ndjson, seed_lines, with_fields, wrk  # noqa: E402

TICKS_S = os.sysconf("SC_CLK_TCK")


def bodies(start_ms: int) -> dict[str, tuple[str, bytes, str, int]]:
    """name -> (path, body, content type, connections)."""
    k1, k10 = make_events(1000, start_ms), make_events(10_000, start_ms)
    return {
        "ndjson1k": ("/v1/events", ndjson(k1), "application/x-ndjson", 16),
        "ndjson1k_fields": (  # every field a tracker sends: path, referrer, UA, visitor
            "/v1/events",
            ndjson(with_fields(k1)),
            "application/x-ndjson",
            16,
        ),
        "ndjson1k_ids": (
            "/v1/events",
            ndjson(make_events(1000, start_ms, ids=True)),
            "application/x-ndjson",
            16,
        ),
        "json1k": ("/v1/events", orjson.dumps(k1), "application/json", 16),
        "ndjson5k_ids": (  # flowray ingest's requests
            "/v1/events",
            ndjson(make_events(5000, start_ms, ids=True)),
            "application/x-ndjson",
            8,
        ),
        "ndjson100": ("/v1/events", ndjson(k1[:100]), "application/x-ndjson", 16),
        "ndjson10k": ("/v1/events", ndjson(k10), "application/x-ndjson", 8),
        "seed10k": ("/v1/logs", seed_lines(k10), "text/plain", 8),
        "single": (
            "/v1/events",
            orjson.dumps({"site": "site1.example.com", "path": "/"}),
            "application/json",
            64,
        ),
    }


def cpu_by_pid(sid: int) -> dict[int, tuple[str, float]]:
    """pid -> (process title, CPU seconds) of every process in session ``sid``."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:
                continue
            title = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, IndexError, ValueError):
            continue
        out[int(stat.parent.name)] = (title, (int(fields[11]) + int(fields[12])) / TICKS_S)
    return out


def roles(ingest_url: str) -> dict[int, str]:
    """pid -> 'master' or 'follower' for the replicas, from the admin status."""
    status = httpx.get(f"{ingest_url}/v1/admin/status", timeout=30).json()
    out = {}
    for group in status["groups"]:
        for r in group["replicas"]:
            if "pid" in r:
                out[int(r["pid"])] = "master" if r.get("role") == "master" else "follower"
    return out


def role_of(pid: int, title: str, replicas: dict[int, str]) -> str:
    if pid in replicas:
        return replicas[pid] + "s"
    if title.startswith("ray::Gateway"):
        return "gateways"
    if title.startswith("ray::Processor"):
        return "processor"
    return "ray and the rest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--body",
        default="ndjson1k",
        help="ndjson1k, ndjson1k_fields (every field a tracker sends), ndjson1k_ids (each "
        "event a unique id), ndjson5k_ids, json1k (a JSON "
        "array), ndjson100, ndjson10k, seed10k or single; several, comma-separated, take "
        "turns in each round on the same cluster",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8, help="per round (whole seconds)")
    args = parser.parse_args()
    start_ms = int(time.time() * 1000) - 3 * 3_600_000
    table = bodies(start_ms)
    names = [name.strip() for name in args.body.split(",") if name.strip()]
    unknown = [name for name in names if name not in table]
    if unknown or not names:
        parser.error(f"unknown body {unknown}; choose from {', '.join(table)}")
    with Flowray() as fr:
        time.sleep(2)
        sid = int(json.loads((fr.dir / "data" / "cluster.json").read_text())["pid"])
        replicas = roles(fr.ingest)
        for _, name in itertools.product(range(args.rounds), names):
            path, body, ctype, conns = table[name]
            before = cpu_by_pid(sid)
            result = wrk(f"{fr.ingest}{path}", body, ctype, args.seconds, conns)
            after = cpu_by_pid(sid)
            requests = result["rps"] * int(args.seconds)  # wrk runs whole seconds
            if requests <= 0:
                print(f"{name}: no request answered ({result})", flush=True)
                continue
            per: dict[str, float] = {}
            for pid, (title, cpu) in after.items():
                used = cpu - before.get(pid, (title, 0.0))[1]
                role = role_of(pid, title, replicas)
                per[role] = per.get(role, 0.0) + used
            total = sum(per.values())
            parts = ", ".join(
                f"{role} {1000 * used / requests:.2f}" for role, used in sorted(per.items())
            )
            print(
                f"{name}: {result['rps']:,.0f} req/s ({result['errors']:.0f} errors), "
                f"CPU {1000 * total / requests:.2f} ms a request ({parts})",
                flush=True,
            )
            time.sleep(1)


if __name__ == "__main__":
    main()
