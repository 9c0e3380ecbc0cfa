"""Prometheus metrics of an API process, with the cluster's gauges read at scrape time,
and the operational routes: liveness and the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field


class Metrics:
    """The counters, histograms and gauges one API process exports."""

    # Long: a declaration per metric, with its help text.
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "flowray_ingest_events_total", "Events accepted", registry=self.registry
        )
        self.rejected = Counter(
            "flowray_ingest_rejected_total", "Batches rejected", ["status"], registry=self.registry
        )
        self.commit = Histogram(
            "flowray_ingest_commit_seconds",
            "Ingest latency to commit",
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
        )
        self.queries = Counter(
            "flowray_queries_total", "Traffic queries", ["cache"], registry=self.registry
        )
        gauge = self._gauge
        self.lag = gauge(
            "flowray_replication_lag_entries",
            "Log entries a replica is behind its group's master",
            "group",
            "replica",
        )
        self.up = gauge("flowray_replica_up", "1 when a replica answers", "group", "replica")
        self.term = gauge(
            "flowray_group_term",
            "A group's highest term among its replicas: each failover raises it",
            "group",
        )
        self.has_master = gauge(
            "flowray_group_has_master",
            "1 when a replica of the group answers as its master (0: an election is on, "
            "writes to the group get 503)",
            "group",
        )
        self.is_master = gauge(
            "flowray_replica_is_master",
            "1 for the replica that answers as its group's master",
            "group",
            "replica",
        )
        self.commit_index = gauge(
            "flowray_replica_commit_index",
            "The highest log index a replica knows to be committed",
            "group",
            "replica",
        )
        self.abstaining = gauge(
            "flowray_replica_abstaining",
            "1 while a replica that restarted without its state abstains from votes "
            "until it has caught up",
            "group",
            "replica",
        )
        self.pending = gauge(
            "flowray_blocks_pending", "Blocks sealed but not yet published, per group", "group"
        )
        self.open_blocks = gauge(
            "flowray_blocks_open", "Blocks still taking events, per group", "group"
        )
        self.late = gauge(
            "flowray_late_events",
            "Events for hours already sealed, since the group's master started",
            "group",
        )
        self.last_job_s = gauge(
            "flowray_processing_last_job_seconds", "Duration of the last processing job"
        )
        self.jobs = gauge("flowray_processing_jobs", "Processing jobs since the processor started")
        self.joined = Counter(
            "flowray_query_joined_total",
            "Queries answered by an identical query already running",
            registry=self.registry,
        )
        self.denied = Counter(
            "flowray_auth_denied_total",
            "Requests refused by auth (401, 403, 429)",
            ["status"],
            registry=self.registry,
        )
        self.query_s = Histogram(
            "flowray_query_seconds",
            "Traffic query latency",
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1),
        )

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(name, doc, list(labels), registry=self.registry)


def cluster_metrics(m: Metrics, status: dict[str, Any]) -> None:
    """Gauges from the cluster's status, read at scrape time. The master is one that
    says so in the group's highest term (a stale one, cut off in an older term, is
    not); a replica that does not answer has no lag, commit index or abstaining."""
    for group in status.get("groups", []):
        g = str(group.get("group"))
        replicas = group.get("replicas", [])
        terms = [r["term"] for r in replicas if isinstance(r.get("term"), int)]
        top_term = max(terms, default=None)
        masters = [
            r
            for r in replicas
            if r.get("role") == "master" and (top_term is None or r.get("term") == top_term)
        ]
        top = max((r.get("last_index", 0) for r in masters), default=None)
        m.has_master.labels(g).set(1 if masters else 0)
        if top_term is not None:
            m.term.labels(g).set(top_term)
        for r in replicas:
            labels = (g, str(r.get("replica")))
            alive = "last_index" in r
            m.up.labels(*labels).set(1 if alive else 0)
            m.is_master.labels(*labels).set(1 if any(r is x for x in masters) else 0)
            if not alive:
                for gone in (m.lag, m.commit_index, m.abstaining):
                    with contextlib.suppress(KeyError):  # never reported
                        gone.remove(*labels)
                continue
            if top is not None:
                m.lag.labels(*labels).set(max(0, top - r["last_index"]))
            m.commit_index.labels(*labels).set(r.get("commit_index") or 0)
            m.abstaining.labels(*labels).set(1 if r.get("abstaining") else 0)
        for r in masters:
            m.pending.labels(g).set(r.get("sealed_pending") or 0)
            m.open_blocks.labels(g).set(r.get("blocks_open") or 0)
            m.late.labels(g).set(r.get("late_events") or 0)
    processor = status.get("processor") or {}
    if isinstance(processor.get("jobs"), int):
        m.jobs.set(processor["jobs"])
    seconds = (processor.get("last_job") or {}).get("seconds")
    if isinstance(seconds, int | float):
        m.last_job_s.set(seconds)


class Health(BaseModel):
    status: str = Field(description="ok while the process serves")
    cache: str = Field(description="The query cache in use: redis or memory")
    pid: int


def router(
    metrics: Metrics,
    status: Callable[[], Awaitable[dict[str, Any]]],
    cache_name: str,
    timeout_s: float,
) -> APIRouter:
    """/healthz and /metrics; ``status`` gives the cluster's status for the gauges."""
    api = APIRouter(tags=["operations"])

    @api.get("/healthz", summary="Liveness", response_model=Health)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "cache": cache_name, "pid": os.getpid()}

    @api.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "description": "The text exposition format",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus() -> Response:
        try:
            answer = await asyncio.wait_for(status(), timeout_s)
        except Exception:  # the cluster's state is unknown now: serve this process's own
            answer = {}
        cluster_metrics(metrics, answer)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return api
