"""The CLI as a new user runs it: 'flowray up --detach' in its own process and Ray,
then ingest, process, query, status and down, each a separate command."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowray.cluster.control import MALLOC_ENV
from tests.conftest import free_port

COMMANDS = ["up", "down", "status", "ingest", "process", "query", "demo", "bench"]


def flowray(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowray", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    result = flowray(*args, env=dict(os.environ), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def _session_alive(sid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[dict[str, str]]:
    data_dir = tmp_path_factory.mktemp("cli") / "flowray-data"
    env = dict(
        os.environ,
        FLOWRAY_DATA_DIR=str(data_dir),
        FLOWRAY_REDIS_URL=redis_url,
        FLOWRAY_SEAL_GRACE_S="0",
    )
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    result = flowray(
        "up",
        "--detach",
        "--port",
        str(port),
        "--ingest-port",
        str(free_port()),
        "--groups",
        "2",
        "--replicas",
        "3",
        "--shards",
        "4",
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((data_dir / "cluster.json").read_text())
    env["_PID"] = str(record["pid"])
    yield env
    if (data_dir / "cluster.json").exists():
        flowray("down", env=env)


def _write_inputs(tmp: Path) -> tuple[Path, Path, Path]:
    seed = tmp / "seed.log"
    seed.write_text(
        "2020.03.14 07:20:39.595 taobao.com\n"
        "2020.03.14 07:25:42.412 tmall.com\n"
        "this line is garbage\n"
        "2020.03.14 07:25:59.999 TaoBao.com\n"
        "2020.03.14 08:00:00.000 taobao.com\n"
    )
    combined = tmp / "access.log.gz"
    with gzip.open(combined, "wt") as fh:
        fh.write('127.0.0.1 - - [14/Mar/2020:15:21:00 +0800] "GET / HTTP/1.1" 200 5 "-" "curl"\n')
        fh.write('::1 - - [14/Mar/2020:07:21:30 +0000] "GET /a HTTP/1.1" 200 5 "-" "x"\n')
        fh.write("not a log line at all\n")
    ndjson = tmp / "events.ndjson"
    ndjson.write_text(
        '{"ts": "2020-03-14T07:22:00Z", "site": "taobao.com", "id": "n1"}\n'
        '{"ts": "2020-03-14T07:22:00Z", "site": "taobao.com", "id": "n1"}\n'
        '{"ts": 1584170580000, "site": "tmall.com"}\n'
    )
    return seed, combined, ndjson


def test_new_user_flow(cli_env: dict[str, str], tmp_path: Path) -> None:
    seed, combined, ndjson = _write_inputs(tmp_path)
    result = flowray("ingest", str(seed), env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "accepted 4 events" in result.stdout
    assert "seed.log:3:" in result.stderr  # the bad line, by number
    result = flowray(
        "ingest", str(combined), "--format", "combined", "--site", "taobao.com", env=cli_env
    )
    assert result.returncode == 0, result.stderr
    assert "accepted 2 events" in result.stdout and "access.log.gz:3:" in result.stderr
    result = flowray("ingest", str(ndjson), env=cli_env)
    assert result.returncode == 0 and "accepted 3 events" in result.stdout, result.stderr
    # Sending the same file again is safe: every line carries a deterministic id.
    assert flowray("ingest", str(seed), env=cli_env).returncode == 0

    result = flowray("process", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "processed" in result.stdout

    result = flowray(
        "query",
        "taobao.com",
        "--start",
        "2020-03-14T07:00:00Z",
        "--end",
        "2020-03-14T09:00:00Z",
        "--interval",
        "hour",
        "--format",
        "json",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    points = json.loads(result.stdout)["points"]
    # 07:20:39, 07:25:59 (seed), 07:21:00 and 07:21:30 (combined), 07:22 (ndjson, once)
    assert [p["count"] for p in points] == [5, 1]
    result = flowray(
        "query",
        "tmall.com",
        "--start",
        "2020-03-14T07:25:00Z",
        "--end",
        "2020-03-14T07:27:00Z",
        "--format",
        "csv",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "t,count,provisional",
        "2020-03-14T07:25:00+00:00,1,false",
        "2020-03-14T07:26:00+00:00,0,false",
    ]
    table = flowray(
        "query",
        "tmall.com",
        "--start",
        "2020-03-14",
        "--end",
        "2020-03-15",
        "--interval",
        "day",
        env=cli_env,
    )
    assert table.returncode == 0 and "total 2" in table.stdout, table.stdout

    result = flowray("status", "--json", env=cli_env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert len(status["groups"]) == 2
    for group in status["groups"]:
        roles = sorted(r["role"] for r in group["replicas"])
        assert roles == ["follower", "follower", "master"]
        for r in group["replicas"]:
            assert r["term"] >= 1 and r["pid"] > 0 and r["node"]
            assert r["commit_index"] <= r["last_index"]
    human = flowray("status", env=cli_env)
    assert human.returncode == 0, human.stderr
    assert "master" in human.stdout and "warehouse" in human.stdout
    # --data-dir before the command works as well as after it.
    elsewhere = {k: v for k, v in cli_env.items() if k != "FLOWRAY_DATA_DIR"}
    result = flowray("--data-dir", cli_env["FLOWRAY_DATA_DIR"], "status", "--json", env=elsewhere)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["groups"]) == 2

    result = flowray("demo", "--sites", "3", "--hours", "2", "--events", "3000", env=cli_env)
    assert result.returncode == 0 and "sent 3000 events" in result.stdout, result.stderr
    assert flowray("process", "--all", env=cli_env).returncode == 0
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    soon = str(int(time.time() * 1000) + 60_000)
    result = flowray(
        "query",
        "demo-0.example",
        "--start",
        day,
        "--end",
        soon,
        "--interval",
        "hour",
        "--format",
        "json",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    assert sum(p["count"] for p in json.loads(result.stdout)["points"]) > 0
    # Without --start and --end: the last 24 hours, a sparkline above the table.
    result = flowray("query", "demo-0.example", "--interval", "hour", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "\u2588" in result.stdout  # the sparkline's peak
    assert int(result.stdout.split("total ")[1].split(";")[0]) > 0

    result = flowray(
        "query", "taobao.com", "--start", "2020-03-14", "--end", "2020-03-13", env=cli_env
    )
    assert result.returncode == 1 and "end must be after start" in result.stderr


def test_down_stops_everything_up_started(cli_env: dict[str, str]) -> None:
    pid = int(cli_env["_PID"])
    assert _session_alive(pid), "the detached cluster should be running"
    result = flowray("down", env=cli_env)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 30
    while _session_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_alive(pid), "processes of 'flowray up' outlived 'flowray down'"
    result = flowray("status", env=cli_env)
    assert result.returncode == 1 and "no running cluster" in result.stderr


def test_even_replica_count_is_refused(tmp_path: Path) -> None:
    env = dict(os.environ, FLOWRAY_DATA_DIR=str(tmp_path / "d"))
    result = flowray("up", "--replicas", "2", env=env, timeout=60)
    assert result.returncode == 1
    assert "odd" in result.stderr


def _ack_events(url: str, n: int, tag: str) -> list[dict[str, object]]:
    import httpx

    events: list[dict[str, object]] = [
        {"ts": 1_600_000_000_000 + i * 997, "site": f"r{i % 7}.example", "id": f"{tag}{i}"}
        for i in range(n)
    ]
    with httpx.Client(base_url=url, timeout=60) as client:
        for lo in range(0, n, 500):
            response = client.post("/v1/events", json=events[lo : lo + 500])
            assert response.status_code == 200, response.text
    return events


def _total(env: dict[str, str]) -> int:
    total = 0
    for site in range(7):
        result = flowray(
            "query",
            f"r{site}.example",
            "--start",
            "2020-09-01",
            "--end",
            "2020-09-30",
            "--interval",
            "day",
            "--format",
            "json",
            env=env,
        )
        assert result.returncode == 0, result.stderr
        total += sum(p["count"] for p in json.loads(result.stdout)["points"])
    return total


def test_whole_cluster_restart_recovers_every_acknowledged_event(
    tmp_path: Path, redis_url: str
) -> None:
    data_dir = tmp_path / "flowray-data"
    env = dict(
        os.environ,
        FLOWRAY_DATA_DIR=str(data_dir),
        FLOWRAY_REDIS_URL=redis_url,
        FLOWRAY_SEAL_GRACE_S="0",
    )
    env.pop("RAY_ADDRESS", None)
    port, ingest_port = str(free_port()), str(free_port())

    def up() -> int:
        result = flowray(
            "up",
            "--detach",
            "--port",
            port,
            "--ingest-port",
            ingest_port,
            "--groups",
            "2",
            "--shards",
            "4",
            env=env,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return int(json.loads((data_dir / "cluster.json").read_text())["pid"])

    pid = up()
    try:
        url = f"http://127.0.0.1:{port}"
        first = _ack_events(url, 3000, "a")
        # flowray's processes run with the allocator settings (cluster.MALLOC_ENV).
        wanted = {f"{k}={v}".encode() for k, v in MALLOC_ENV.items()}
        kinds: list[bytes] = []
        for member in _session_alive(pid):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                kind = Path(f"/proc/{member}/cmdline").read_bytes().split(b"\0")[0]
                if kind in (b"ray::Replica", b"ray::Gateway", b"ray::Processor"):
                    have = set(Path(f"/proc/{member}/environ").read_bytes().split(b"\0"))
                    assert wanted <= have, (member, kind, wanted - have)
                    kinds.append(kind)
        assert sorted(set(kinds)) == [b"ray::Gateway", b"ray::Processor", b"ray::Replica"]
        for victim in _session_alive(pid):  # kill -9 every process of the cluster at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _session_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        pid = up()  # over the same data directory, nothing acknowledged may be missing
        second = _ack_events(url, 2000, "b")
        assert flowray("process", env=env).returncode == 0
        assert _total(env) == len(first) + len(second)
        assert flowray("down", env=env).returncode == 0
        up()  # a clean stop and start keeps everything too
        assert flowray("process", env=env).returncode == 0
        assert _total(env) == len(first) + len(second)
    finally:
        flowray("down", env=env)


def test_bench_refuses_an_unknown_benchmark() -> None:
    result = flowray("bench", "nonsense", env=dict(os.environ), timeout=60)
    assert result.returncode == 2 and "'freshness'" in result.stderr, result.stderr


def test_bench_passes_its_arguments_to_the_script() -> None:
    result = flowray("bench", "query", "--", "--help", env=dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "100,000 sites" in result.stdout
