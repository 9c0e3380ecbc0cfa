"""A small HTTP client for a running flowray cluster, used by the CLI and the tests.

Writes are retried on 503, 429 and connection errors with the same bytes, so events that
carry ids are counted once however many times a batch is sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

RETRIES_MAX = 8
BACKOFF_S_MAX = 5.0
# 503: a group has no quorum now; 429: the token's rate limit. Both say when to retry.
RETRY_STATUSES = (429, 503)


class ClusterNotFound(RuntimeError):
    pass


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("error") if isinstance(body, dict) else str(body)
        if status == 401:
            message = f"{message} (set FLOWRAY_TOKEN, or FLOWRAY_ADMIN_TOKEN)"
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


def find_url(data_dir: Path, url: str | None, key: str = "url") -> str:
    """The API's URL (or with ``key="ingest_url"`` the ingest gateway's): given
    explicitly, or recorded by ``flowray up`` in the data directory."""
    if url:
        return url.rstrip("/")
    record = data_dir / "cluster.json"
    if not record.exists():
        raise ClusterNotFound(
            f"no running cluster recorded in {data_dir} (start one with 'flowray up "
            f"--data-dir {data_dir}', or pass --url)"
        )
    recorded = json.loads(record.read_text())
    return str(recorded.get(key) or recorded["url"]).rstrip("/")


class Client:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    def post_with_retry(self, path: str, content: bytes, content_type: str) -> Any:
        """POST, retrying 503s, 429s and transport errors with backoff; other errors raise."""
        delay = 0.2
        for attempt in range(RETRIES_MAX + 1):
            try:
                response = self.http.post(
                    path, content=content, headers={"Content-Type": content_type}
                )
            except httpx.TransportError:
                if attempt == RETRIES_MAX:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or attempt == RETRIES_MAX:
                    return self._json(response)
                delay = float(response.headers.get("Retry-After", delay))
            time.sleep(min(delay, BACKOFF_S_MAX))
            delay = min(delay * 2, BACKOFF_S_MAX)
        raise AssertionError("unreachable")  # pragma: no cover

    def send_events(self, events: list[dict[str, Any]]) -> int:
        import orjson

        body = b"\n".join(orjson.dumps(e) for e in events)
        return int(self.post_with_retry("/v1/events", body, "application/x-ndjson")["accepted"])

    def traffic(self, site: str, **params: Any) -> Any:
        return self._json(self.http.get(f"/v1/sites/{site}/traffic", params=params))

    def traffic_text(self, site: str, **params: Any) -> str:
        response = self.http.get(f"/v1/sites/{site}/traffic", params=params)
        if response.status_code >= 400:
            self._json(response)
        return response.text

    def timeseries(self, site: str, **params: Any) -> Any:
        """Visitors, pageviews and events per bucket; ``filter`` may be a list (the
        parameter repeats). See ``GET /v1/sites/{site}/timeseries``."""
        return self._json(self.http.get(f"/v1/sites/{site}/timeseries", params=params))

    def totals(self, site: str, **params: Any) -> Any:
        """The range's totals, with the previous period for ``compare="previous_period"``."""
        return self._json(self.http.get(f"/v1/sites/{site}/totals", params=params))

    def breakdown(self, site: str, **params: Any) -> Any:
        """The metrics per value of the dimension ``by``, a page at a time."""
        return self._json(self.http.get(f"/v1/sites/{site}/breakdown", params=params))

    def plausible_query(self, body: dict[str, Any]) -> Any:
        """A Plausible Stats API v2 query; see ``POST /api/v2/query``."""
        return self._json(self.http.post("/api/v2/query", json=body))

    def status(self) -> Any:
        return self._json(self.http.get("/v1/admin/status"))

    def process(self, mode: str = "closed") -> Any:
        return self._json(self.http.post("/v1/admin/process", params={"mode": mode}, timeout=900))

    def reprocess(self, **request: Any) -> Any:
        """Start a re-processing job; see ``POST /v1/admin/reprocess``."""
        return self._json(self.http.post("/v1/admin/reprocess", json=request))

    def rollback(self, to_version: int | None = None) -> Any:
        params = {} if to_version is None else {"to": to_version}
        return self._json(self.http.post("/v1/admin/rollback", params=params))

    def job(self, job_id: str) -> Any:
        return self._json(self.http.get(f"/v1/admin/jobs/{job_id}"))

    def restart(self) -> Any:
        """Start a rolling restart; see ``POST /v1/admin/restart``."""
        return self._json(self.http.post("/v1/admin/restart"))

    def move_shard(self, shard: int, to_group: int) -> Any:
        return self._json(self.http.post(f"/v1/admin/shards/{shard}/move", params={"to": to_group}))

    def versions(self) -> Any:
        return self._json(self.http.get("/v1/admin/versions"))

    def wait_job(
        self,
        job: dict[str, Any],
        timeout_s: float,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.5,
    ) -> dict[str, Any]:
        """Poll a job until it is done or failed (a failed job raises ApiError)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                state: dict[str, Any] = self.job(job["job"])
            except (ApiError, httpx.HTTPError) as exc:
                # The API process itself may be replaced meanwhile (a rolling restart).
                if isinstance(exc, ApiError) and exc.status < 500:
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(poll_s)
                continue
            if on_progress is not None:
                on_progress(state)
            if state["state"] == "done":
                return state
            if state["state"] == "failed":
                raise ApiError(500, {"error": f"{state['kind']} failed: {state['error']}"})
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job['job']} still running after {timeout_s} s")
            time.sleep(poll_s)

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
