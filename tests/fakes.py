"""In-process stand-ins for the cluster's admin calls and ingest, for the app's fast tests."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from flowray.api.app import IngestFastPath
from flowray.ingest.events import events_table
from flowray.ingest.pieces import GroupEvents, Piece, Routed, merge_pieces, split_pieces


def client_for(app: FastAPI, front: str = "fastapi") -> httpx.AsyncClient:
    """A client of the app as Serve runs it, or as the ingest gateway does (``front``)."""
    asgi = IngestFastPath(app) if front == "gateway" else app
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t")


def as_pieces(groups: dict[int, GroupEvents], shard_count: int) -> dict[int, list[Piece]]:
    """What the ingress would send each group's master for one request's events."""
    return {
        g: merge_pieces([e])
        if isinstance(e, Routed)
        else split_pieces(events_table(e), shard_count)
        for g, e in groups.items()
    }


class FakeAdmin:
    """Records what the app asks; jobs finish at once with an empty result."""

    def __init__(self) -> None:
        self.modes: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.jobs: dict[str, dict[str, Any]] = {}

    async def status(self) -> dict[str, Any]:
        return {"groups": [{"group": 0, "master": 0}]}

    async def process(self, mode: str) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        self.modes.append(mode)
        return {"mode": mode, "units": 0}

    def _job(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        job = {"job": f"j{len(self.jobs)}", "kind": kind, "params": params, "state": "done"}
        self.jobs[job["job"]] = job
        return job

    async def reprocess(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["end_ms"] <= request["start_ms"]:
            raise ValueError("end must be after start")
        self.requests.append(request)
        return self._job("reprocess", request)

    async def rollback(self, to_version: int | None) -> dict[str, Any]:
        if to_version is not None and to_version != 1:
            raise ValueError(f"no warehouse version {to_version}")
        return self._job("rollback", {"to": to_version})

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return self.jobs.get(job_id)

    async def versions(self) -> list[dict[str, Any]]:
        return [{"version": 1, "logic": "default", "current": True}]

    async def restart(self) -> dict[str, Any]:
        if any(j["kind"] == "restart" and j["state"] == "running" for j in self.jobs.values()):
            raise ValueError("a rolling restart is already running")
        job = self._job("restart", {})
        job["state"] = "running"
        return job

    async def move_shard(self, shard: int, to_group: int) -> dict[str, Any]:
        if shard > 7 or to_group > 1:
            raise ValueError(f"no shard {shard} or group {to_group}")
        return {"shard": shard, "from_group": 1 - to_group, "to_group": to_group}
