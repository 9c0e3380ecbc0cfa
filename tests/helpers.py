"""Helpers shared by the tests that run a real cluster."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from flowray.cluster import control as cluster
from flowray.config import Settings

HEALTH_TIMEOUT_S = 120.0


def cluster_settings(
    data_dir: Path, port: int, redis_url: str, namespace: str, **overrides: Any
) -> Settings:
    """Settings of a test cluster: loopback ports, hours sealed at once, no background
    processing (tests process when they mean to)."""
    from tests.conftest import free_port

    values: dict[str, Any] = {
        "data_dir": data_dir,
        "port": port,
        "ingest_port": free_port(),
        "groups": 1,
        "replicas": 3,
        "shards": 2,
        "redis_url": redis_url,
        "seal_grace_s": 0,
        "process_interval_s": 3600,
        "namespace": namespace,
    }
    values.update(overrides)
    return Settings(**values)


def wait_healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")


@contextmanager
def running_cluster(settings: Settings) -> Iterator[tuple[cluster.Cluster, str]]:
    """A cluster on the session's Ray and Serve, stopped (by handle) afterwards."""
    running = cluster.start(settings)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_healthy(url)
        yield running, url
    finally:
        cluster.stop(running)


def status(url: str) -> dict:  # type: ignore[type-arg]
    with httpx.Client(base_url=url, timeout=30) as client:
        body: dict = client.get("/v1/admin/status").json()  # type: ignore[type-arg]
        return body


def replica_pid(url: str, group: int, role: str) -> int:
    """The pid of a replica of ``group`` with ``role`` (master or follower)."""
    for g in status(url)["groups"]:
        if g["group"] != group:
            continue
        for r in g["replicas"]:
            if r.get("role") == role:
                return int(r["pid"])
    raise LookupError(f"no {role} in group {group}")


def kill9(pid: int) -> None:
    """kill -9 one process this test session started (a Ray worker of our actor)."""
    os.kill(pid, signal.SIGKILL)


def kill_for_good(handle: Any, timeout_s: float = 30.0) -> None:
    """ray.kill an actor without restart, and return once its process is gone.

    ray.kill only asks: the process can still answer its peers over the write path's
    direct links for a moment, and so still count toward a majority.
    """
    import ray

    pid = int(ray.get(handle.status.remote(), timeout=timeout_s)["pid"])
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise TimeoutError(f"actor process {pid} still runs {timeout_s} s after ray.kill")
