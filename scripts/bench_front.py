#!/usr/bin/env python3
"""Front-door benchmark (issue 22): Ray Serve's default Python proxy, Serve's HAProxy
mode (direct ingress) and flowray's own ingest gateway, measured in one run.

    .venv/bin/python scripts/bench_front.py [--seconds 6] [--replicas 2] [--json FILE]

Starts a fresh flowray cluster twice (``flowray up --detach`` in a child process with
its own data directory under /tmp, so the Serve environment variables are set before
Ray starts): once with Serve's default proxy, once with
``RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` and Debian's
haproxy. In each it loads a little data (events of the last hours, then ``flowray
process``), checks the app's behaviour through both ports (routes, Server-Timing,
413, chunked bodies, 404) and measures, on the Serve port and on the gateway port:

- cached query: one site's 24-hour minute series, queries/s and client p99 (wrk,
  32 connections, after a warm-up request);
- single-event POSTs/s (wrk, 64 connections);
- batched NDJSON POSTs of 1,000 and 10,000 events, events/s (wrk, 8 connections).

With ``--replicas N`` (N > 1) the HAProxy run then redeploys the API with N Serve
replicas (a driver joining that run's own Ray instance) and measures the Serve port
again. Prints one markdown table; raw figures as JSON on stderr (and ``--json``).
Installs ``wrk`` and ``haproxy`` from Debian when missing (root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
FLOWRAY = [sys.executable, "-m", "flowray"]
HOUR_MS = 3_600_000
SITE = "site0.example.com"

LUA_POST = """
wrk.method = "POST"
local f = io.open(os.getenv("BODY"), "rb"); wrk.body = f:read("*all"); f:close()
wrk.headers["Content-Type"] = os.getenv("CTYPE")
"""


def free_port() -> int:
    """A port outside the ephemeral range (tests/ports.py) and outside Serve's direct
    ingress ranges (30000-31000 HTTP, 40000-41000 gRPC), which replicas take from."""
    sys.path.insert(0, str(ROOT))
    from tests.ports import free_port as pick

    while True:
        port = pick()
        if not (30000 <= port <= 31000 or 40000 <= port <= 41000):
            return port


def ensure_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if path:
        return path
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        subprocess.run(command, check=False, capture_output=True, timeout=600)
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if not path:
        sys.exit(f"{name} is needed (Debian package {package})")
    return path


def wrk(url: str, conns: int, seconds: float, body: bytes | None = None, ctype: str = "") -> dict:
    """requests/s, client p99 (ms) and non-2xx count of one wrk run (1 thread)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-front-wrk-"))
    args = [ensure_tool("wrk", "wrk"), "-t1", f"-c{conns}", f"-d{int(seconds)}s", "--latency"]
    env = dict(os.environ)
    if body is not None:
        (tmp / "post.lua").write_text(LUA_POST)
        (tmp / "body").write_bytes(body)
        env |= {"BODY": str(tmp / "body"), "CTYPE": ctype}
        args += ["-s", str(tmp / "post.lua")]
    run = subprocess.run(
        [*args, url], env=env, capture_output=True, text=True, timeout=seconds + 60
    )
    shutil.rmtree(tmp, ignore_errors=True)
    out = run.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockerr = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p99_ms": float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
        if p99
        else 0.0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sockerr.group(1).strip() if sockerr else "",
        "raw": out if not rps else "",
    }


def ndjson_events(n: int, ts_ms: int, sites: int = 50) -> bytes:
    return b"\n".join(
        orjson.dumps({"ts": ts_ms + i % 1000, "site": f"site{i % sites}.example.com", "path": "/p"})
        for i in range(n)
    )


class Cluster:
    """One ``flowray up --detach`` in a fresh data directory under /tmp."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.hap_dir: Path | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-front-{mode}-", dir="/tmp"))
        self.data = self.dir / "data"
        self.port, self.ingest_port = free_port(), free_port()
        self.env = dict(os.environ, FLOWRAY_DATA_DIR=str(self.data), FLOWRAY_REDIS_URL="")
        self.env.pop("RAY_ADDRESS", None)
        if mode == "haproxy":
            # Ray puts each path under a 56-character node id directory
            # (HAProxyManager._per_node) and HAProxy 2.6 refuses unix socket paths
            # over 97 characters: keep the base short.
            hap = Path(tempfile.mkdtemp(prefix="bfh-", dir="/tmp"))
            self.hap_dir = hap
            self.env |= {
                "RAY_SERVE_ENABLE_HA_PROXY": "1",
                # Without direct ingress HAProxy forwards to Serve's Python proxies
                # (controller.get_target_groups); with it, to the replicas' own uvicorn.
                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                "RAY_SERVE_HAPROXY_BINARY_PATH": ensure_tool("haproxy", "haproxy"),
                # Per-run files and ports: the defaults (/tmp/haproxy-serve, 8404,
                # 9101, 8500, 9500) are shared by every Serve on the machine.
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
            }
        self.up_s = 0.0

    def __enter__(self) -> Cluster:
        t0 = time.monotonic()
        result = subprocess.run(
            [
                *FLOWRAY,
                "up",
                "--detach",
                "--data-dir",
                str(self.data),
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
        self.up_s = time.monotonic() - t0
        if result.returncode != 0:
            log = self.data / "logs" / "up.log"
            tail = log.read_text()[-4000:] if log.exists() else ""
            raise RuntimeError(
                f"flowray up ({self.mode}) failed: {result.stdout}{result.stderr}{tail}"
            )
        return self

    def __exit__(self, *_: object) -> None:
        subprocess.run(
            [*FLOWRAY, "down", "--data-dir", str(self.data)],
            env=self.env,
            capture_output=True,
            timeout=180,
        )
        if os.environ.get("BENCH_FRONT_KEEP"):
            print(f"kept {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.hap_dir:
                shutil.rmtree(self.hap_dir, ignore_errors=True)

    def flowray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FLOWRAY, *args, "--data-dir", str(self.data)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def gcs_address(self) -> str:
        """The GCS of this run's own Ray instance (a process in the up's session)."""
        record = json.loads((self.data / "cluster.json").read_text())
        sid = int(record["pid"])
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[3]) != sid:
                    continue
                cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            for arg in cmd:  # the raylet and Ray's agents are given the GCS address
                match = re.match(rb"--gcs[-_]address=(\S+:\d+)$", arg)
                if match and not match.group(1).endswith(b":0"):
                    return match.group(1).decode()
        raise LookupError("no GCS address in the cluster's session")

    def ray_auth_env(self) -> dict[str, str]:
        """RAY_AUTH_* of this run's Ray processes (its GCS refuses drivers without)."""
        record = json.loads((self.data / "cluster.json").read_text())
        for pid in record.get("ray_pids", []):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            found = dict(e.decode().split("=", 1) for e in environ if e.startswith(b"RAY_AUTH"))
            if found:
                return found
        return {}

    def scale_api(self, replicas: int) -> None:
        """Redeploy the Serve app with ``replicas`` API replicas (a driver joining this
        run's Ray instance; the same settings the cluster deployed with)."""
        code = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import ray
from ray import serve
from flowray.config import Settings
from flowray.cluster.control import resolved, settle_layout
from flowray.serve.deployment import APP_NAME, SETTINGS_ENV, Api
s = Settings.from_env(data_dir=Path({str(self.data)!r}), port={self.port},
    ingest_port={self.ingest_port}, groups=2, replicas=3, shards=8, gateways=2).validate()
s = resolved(settle_layout(s))
ray.init(address=os.environ["RAY_ADDRESS"], namespace=s.namespace, logging_level="WARNING",
    _node_ip_address="127.0.0.1")
env = {{SETTINGS_ENV: json.dumps(s.to_json())}}
serve.run(Api.options(num_replicas={replicas},
    ray_actor_options={{"num_cpus": 0, "runtime_env": {{"env_vars": env}}}}).bind(),
    name=APP_NAME, route_prefix="/")
print("scaled")
"""
        # As flowray's init_ray: a local cluster is on loopback; without this the
        # driver looks for the GCS at the machine's other address and hangs.
        env = dict(self.env, RAY_ADDRESS=self.gcs_address(), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        env |= self.ray_auth_env()
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
        )
        if "scaled" not in run.stdout:
            raise RuntimeError(f"scaling the API failed: {run.stdout[-2000:]}{run.stderr[-3000:]}")


def load_data(c: Cluster) -> tuple[str, int]:
    """Events over the last 26 hours for 50 sites (through the gateway), then every
    finished hour processed: the 24 hours before this hour are final, so their query
    is cached for an hour (not 1 s as a live one). Returns the query path and the
    number of events."""
    now = int(time.time() * 1000)
    this_hour = now // HOUR_MS * HOUR_MS
    sent = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{c.ingest_port}", timeout=60) as client:
        for h in range(26, -1, -1):
            body = ndjson_events(2000, this_hour - h * HOUR_MS + 60_000)
            r = client.post(
                "/v1/events", content=body, headers={"content-type": "application/x-ndjson"}
            )
            if r.status_code >= 300:
                raise RuntimeError(f"loading data: {r.status_code} {r.text[:300]}")
            sent += 2000
    proc = c.flowray("process")
    if proc.returncode != 0:
        print(f"flowray process: {proc.stdout}{proc.stderr}", file=sys.stderr)
    start, end = this_hour - 24 * HOUR_MS, this_hour
    return (f"/v1/sites/{SITE}/traffic?start={start}&end={end}&interval=minute&tz=UTC", sent)


def checks(c: Cluster, path: str) -> dict[str, Any]:
    """The app's behaviour through each port: what a proxy could change."""
    out: dict[str, Any] = {}
    big = b"x" * (40 * 1024 * 1024)  # above the 32 MiB body limit
    one = orjson.dumps({"ts": int(time.time() * 1000), "site": SITE, "path": "/c"})

    def chunks() -> Any:
        for _ in range(3):
            yield one + b"\n"

    for name, port in (("serve", c.port), ("gateway", c.ingest_port)):
        r: dict[str, Any] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            try:
                q1 = client.get(path)
                q2 = client.get(path)
                r["query"] = q1.status_code
                r["query_bytes"] = len(q1.content)
                r["query_points"] = len(q1.json().get("points", [])) if q1.status_code == 200 else 0
                r["server_timing"] = [
                    q1.headers.get("server-timing"),
                    q2.headers.get("server-timing"),
                ]
                r["dashboard"] = client.get("/").status_code
                r["status_route"] = client.get("/v1/admin/status").status_code
                r["metrics"] = client.get("/metrics").status_code
                r["not_found"] = client.get("/no/such/route").status_code
                r["bad_site"] = client.get("/v1/sites/%20/traffic?start=0&end=1").status_code
                r["post_one"] = client.post(
                    "/v1/events", content=one, headers={"content-type": "application/json"}
                ).status_code
                r["post_chunked"] = client.post(
                    "/v1/events", content=chunks(), headers={"content-type": "application/x-ndjson"}
                ).status_code
            except Exception as exc:  # report, keep measuring
                r["error"] = repr(exc)
            try:
                resp = client.post(
                    "/v1/events", content=big, headers={"content-type": "application/x-ndjson"}
                )
                r["post_40MB"] = resp.status_code
            except Exception as exc:
                r["post_40MB"] = repr(exc)[:120]
            try:  # a large body sent chunked (no Content-Length): the limit while reading
                resp = client.post(
                    "/v1/events",
                    content=(big[i : i + 8 << 20] for i in range(0, len(big), 8 << 20)),
                    headers={"content-type": "application/x-ndjson"},
                )
                r["post_40MB_chunked"] = resp.status_code
            except Exception as exc:
                r["post_40MB_chunked"] = repr(exc)[:120]
        out[name] = r
    return out


def measure(port: int, path: str, seconds: float) -> dict[str, dict]:
    base = f"http://127.0.0.1:{port}"
    httpx.get(base + path, timeout=60)  # warm-up: fills the cache
    now = int(time.time() * 1000)
    one = orjson.dumps({"ts": now, "site": SITE, "path": "/p"})
    res = {"query": wrk(base + path, 32, seconds)}
    res["single"] = wrk(base + "/v1/events", 64, seconds, one, "application/json")
    for n in (1000, 10_000):
        r = wrk(base + "/v1/events", 8, seconds, ndjson_events(n, now), "application/x-ndjson")
        r["events_s"] = r["rps"] * n
        res[f"batch{n}"] = r
    return res


def run_mode(mode: str, seconds: float, replicas: int) -> dict[str, Any]:
    result: dict[str, Any] = {"mode": mode}
    try:
        with Cluster(mode) as c:
            result["up_s"] = round(c.up_s, 1)
            path, sent = load_data(c)
            result["loaded_events"] = sent
            result["checks"] = checks(c, path)
            result["serve"] = measure(c.port, path, seconds)
            result["gateway"] = measure(c.ingest_port, path, seconds)
            if mode == "haproxy" and replicas > 1:
                try:
                    t0 = time.monotonic()
                    c.scale_api(replicas)
                    result["scale_s"] = round(time.monotonic() - t0, 1)
                    time.sleep(3)  # HAProxy's config follows the new replicas
                    result[f"serve_x{replicas}"] = measure(c.port, path, seconds)
                except Exception as exc:
                    result["scale_error"] = str(exc)[-3000:]
            if mode == "haproxy":
                cfgs = sorted(c.hap_dir.glob("*/haproxy.cfg")) if c.hap_dir else []
                result["haproxy_cfg"] = _read(cfgs[0]) if cfgs else ""
                result["haproxy_pids"] = _pids("haproxy", c)
    except Exception as exc:
        result["error"] = str(exc)[-5000:]
    return result


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _pids(name: str, c: Cluster) -> list[int]:
    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes()
        except OSError:
            continue
        if name.encode() in text.split(b"\0")[0] and str(c.hap_dir).encode() in text:
            out.append(int(cmd.parent.name))
    return out


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "events":
        return f"{v / 1e6:.2f} M" if v >= 1e5 else f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.1f} ms"
    return f"{v:,.0f}"


def table(results: dict[str, dict], replicas: int) -> str:
    default, hap = results["default"], results["haproxy"]
    gw = hap.get("gateway") or default.get("gateway") or {}
    scaled = hap.get(f"serve_x{replicas}")
    rows = [
        ("Cached query, 24 h minute series (queries/s, 32 conns)", "query", "rps", "n", True),
        ("Cached query p99 at the client (32 conns)", "query", "p99_ms", "ms", False),
        ("Single-event POSTs/s (64 conns)", "single", "rps", "n", True),
        (
            "Batched POSTs, 1,000 events (events/s, 8 conns)",
            "batch1000",
            "events_s",
            "events",
            True,
        ),
        (
            "Batched POSTs, 10,000 events (events/s, 8 conns)",
            "batch10000",
            "events_s",
            "events",
            True,
        ),
    ]
    head = ["measurement", "Serve default proxy", "Serve HAProxy mode (1 replica)"]
    if scaled:
        head.append(f"Serve HAProxy mode ({replicas} replicas)")
    head += ["gateway", "default / gateway", "HAProxy / gateway"]
    if scaled:
        head.append(f"HAProxy ×{replicas} / gateway")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def get(src: dict | None, key: str, field: str) -> float | None:
        if not src or key not in src:
            return None
        return src[key].get(field)

    for label, key, field, unit, _higher in rows:
        g = get(gw, key, field)
        vals = [get(default.get("serve"), key, field), get(hap.get("serve"), key, field)]
        if scaled:
            vals.append(get(scaled, key, field))
        cells = [label, *(fmt(v, unit) for v in vals), fmt(g, unit)]
        for v in vals:
            cells.append(f"{v / g:.2f}×" if v is not None and g else "—")
        lines.append("| " + " | ".join(cells) + " |")
    errs = []
    for name, src in (
        ("default", default.get("serve")),
        ("haproxy", hap.get("serve")),
        (f"haproxy x{replicas}", scaled),
        ("gateway", gw),
    ):
        for key, r in (src or {}).items():
            if r.get("non2xx") or r.get("socket_errors"):
                sock = r.get("socket_errors") or 0
                errs.append(f"{name}/{key}: non-2xx {r.get('non2xx')}, socket errors {sock}")
    out = "\n".join(lines)
    if errs:
        out += "\n\nErrors during load: " + "; ".join(errs)
    return out


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    hap = subprocess.run(
        [ensure_tool("haproxy", "haproxy"), "-v"], capture_output=True, text=True
    ).stdout.splitlines()[0]
    import ray

    return (
        f"{socket.gethostname()}: {os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB, "
        f"{platform.platform()}, Python {platform.python_version()}, Ray {ray.__version__}, "
        f"{hap.split(' - ')[0]}; load generator wrk (1 thread) on the same cores"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per wrk run")
    ap.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="API replicas for the extra HAProxy column (1: none)",
    )
    ap.add_argument("--json", type=Path, help="write the raw figures here too")
    ap.add_argument("--modes", default="default,haproxy", help="which clusters to run")
    args = ap.parse_args()
    ensure_tool("wrk", "wrk")
    ensure_tool("haproxy", "haproxy")
    t0 = time.monotonic()
    results: dict[str, dict] = {"default": {}, "haproxy": {}}
    for mode in args.modes.split(","):
        print(f"# {mode}: starting a cluster ...", file=sys.stderr, flush=True)
        results[mode] = run_mode(mode, args.seconds, args.replicas)
        if "error" in results[mode]:
            print(f"# {mode} failed: {results[mode]['error']}", file=sys.stderr)
    raw = json.dumps(results, indent=2, default=str)
    print(raw, file=sys.stderr)
    if args.json:
        args.json.write_text(raw)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"## Front door: Serve default proxy, Serve HAProxy mode, gateway ({when})\n")
    print(table(results, args.replicas))
    print(f"\nMachine: {machine()}. Wall time {time.monotonic() - t0:.0f} s.")
    for mode in ("default", "haproxy"):
        ch = results[mode].get("checks")
        if ch:
            print(f"\nChecks ({mode}): {json.dumps(ch)}")
        if "error" in results[mode]:
            print(f"\n{mode} failed: {results[mode]['error'][-1500:]}")
        if "scale_error" in results[mode]:
            print(f"\n{mode} scaling failed: {results[mode]['scale_error'][-1500:]}")


if __name__ == "__main__":
    main()
