"""Clients that keep writing through faults, and the check that they lost nothing.

A :class:`Writer` sends batches of events with unique ids into one hour and retries
each batch, with the same ids, until it is acknowledged; it notes when each was.
:func:`check_exactly_once` then processes that hour and compares every site's count
with what was acknowledged: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

HOUR_MS = 3_600_000
SITES = [f"shop{i}.example" for i in range(40)]


class Writer(threading.Thread):
    """Sends batches with unique ids into ``hour_ms``; retries each until acknowledged."""

    def __init__(self, url: str, tag: str, hour_ms: int, batch: int = 200) -> None:
        super().__init__(daemon=True)
        self.url, self.tag, self.hour_ms, self.batch = url, tag, hour_ms, batch
        self.stop = threading.Event()
        self.acked: list[dict[str, Any]] = []
        self.acked_at: list[float] = []  # time.monotonic() of each acknowledgement
        self.failures: list[tuple[float, float]] = []  # (first failure, next success)
        self.errors: Counter[int] = Counter()
        self.rng = random.Random(tag)

    def run(self) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                events = [
                    {
                        "ts": self.hour_ms + self.rng.randrange(HOUR_MS),
                        "site": self.rng.choice(SITES),
                        "id": f"{self.tag}-{n + i}",
                    }
                    for i in range(self.batch)
                ]
                n += self.batch
                self._send_until_acked(client, events)

    def _send_until_acked(self, client: httpx.Client, events: list[dict[str, Any]]) -> None:
        body = orjson.dumps(events)
        failed_at = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                response = client.post(
                    "/v1/events", content=body, headers={"Content-Type": "application/json"}
                )
                status_code = response.status_code
            except httpx.HTTPError:
                status_code = 0
            if status_code == 200:
                self.acked.extend(events)
                self.acked_at.append(time.monotonic())
                if failed_at is not None:
                    self.failures.append((failed_at, time.monotonic()))
                return
            self.errors[status_code] += 1
            assert status_code in (0, 503), f"unexpected answer {status_code}"
            failed_at = failed_at or time.monotonic()
            time.sleep(0.05)
        raise AssertionError("a batch was never acknowledged within 60 s")

    def longest_gap_s(self, since: float) -> float:
        """The longest wait between acknowledgements from ``since`` to the last one."""
        times = [since, *(t for t in self.acked_at if t > since)]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def check_exactly_once(url: str, acked: list[dict[str, Any]], hour_ms: int) -> None:
    """The hour that only these writers wrote to holds each acknowledged id exactly once."""
    start = datetime.fromtimestamp(hour_ms / 1000, tz=UTC)
    with httpx.Client(base_url=url, timeout=600) as client:
        result = client.post("/v1/admin/process", params={"mode": "all"}).json()
        assert "blocks" in result, result
        want = Counter(e["site"] for e in {e["id"]: e for e in acked}.values())
        for site in SITES:
            body = client.get(
                f"/v1/sites/{site}/traffic",
                params={
                    "start": start.isoformat(),
                    "end": (start + timedelta(hours=1)).isoformat(),
                    "interval": "hour",
                },
            ).json()
            got = sum(p["count"] for p in body["points"])
            assert got == want[site], f"{site}: {got} counted, {want[site]} acknowledged"
