"""The dashboard in a real headless Chromium against a real cluster with known data.

Events of one site over a past day go in through the API, are processed into the
warehouse, and the page is opened the way a merchant opens a shared link:
``/?site=&start=&end=&interval=hour&tz=UTC``. The page must fill its form from the
address, load at once and draw the series: the chart's ``data-points`` and
``data-total`` are read from the DOM Chromium dumps, and a screenshot is kept under
``test-artifacts/`` (its bars are counted, so it is known to show the data).

scripts/test installs Chromium (apt-get, as root), so CI always runs this test. Where
it is missing (no root to install it), the test skips and says why.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from flowray.cluster import control as cluster
from tests.helpers import cluster_settings, running_cluster

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT_S = 120
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SITE = "dash.example"
OTHER = "elsewhere.example"
DAY = datetime(2024, 5, 1, tzinfo=UTC)  # a day long past: every hour is processable
HOUR_MS = 3_600_000
# Hour h of DAY gets 3 + (h * 7) % 11 events, so the bars differ in height.
HOURLY = [3 + (h * 7) % 11 for h in range(24)]
BAR_RGB = (0x33, 0x66, 0xAA)  # processed bars (#36a)
PROVISIONAL_RGB = (0x99, 0xBB, 0xCC)  # provisional bars (#9bc)


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: the dashboard test needs a real Chromium. Run the "
            "suite with scripts/test as root (it installs it) or: apt-get install -y chromium"
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def dashboard_cluster(
    chromium: Path,
    ray_session: None,
    redis_url: str,
    serve_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[cluster.Cluster, str]]:
    settings = cluster_settings(
        tmp_path_factory.mktemp("dashboard"), serve_port, redis_url, "flowray-dashboard"
    )
    with running_cluster(settings) as running:
        yield running


def _events() -> list[dict[str, object]]:
    base_ms = int(DAY.timestamp() * 1000)
    events: list[dict[str, object]] = []
    for hour, count in enumerate(HOURLY):
        for n in range(count):
            ts = base_ms + hour * HOUR_MS + (n * 397_000) % HOUR_MS
            events.append({"ts": ts, "site": SITE, "path": f"/p/{n}"})
    # Another site's traffic in the same hours must not show up in SITE's chart.
    events += [{"ts": base_ms + h * HOUR_MS + 1, "site": OTHER} for h in range(24)]
    return events


@pytest.fixture(scope="module")
def loaded(dashboard_cluster: tuple[cluster.Cluster, str]) -> str:
    """The API's URL once SITE's day is ingested and processed into the warehouse."""
    _running, url = dashboard_cluster
    events = _events()
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/v1/events", json=events)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"accepted": len(events)}
        processed = client.post("/v1/admin/process", params={"mode": "all"})
        assert processed.status_code == 200, processed.text
    return url


def _query() -> dict[str, str]:
    return {
        "site": SITE,
        "start": DAY.strftime("%Y-%m-%dT%H:%M"),
        "end": (DAY + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"),
        "interval": "hour",
        "tz": "UTC",
    }


def _run_chromium(chromium: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


class _Elements(HTMLParser):
    """Attributes and text of every element with an id, from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if "id" in values:
            self.attrs[values["id"]] = values
            self.text[values["id"]] = ""
        if tag not in ("input", "meta", "br", "img", "link"):
            self._open.append(values.get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in ("input", "meta", "br", "img", "link"):
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element in self._open:
            if element is not None:
                self.text[element] += data


def _rgba_rows(png: bytes) -> list[list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) to rows."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        header = data if kind == b"IHDR" else header
        idat += data if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 4 if color == 6 else 3
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append([tuple(line[x : x + 3]) for x in range(0, stride, bpp)])
        prev = line
    return rows  # type: ignore[return-value]


def _bars(
    rows: list[list[tuple[int, int, int]]],
    colours: frozenset[tuple[int, int, int]] = frozenset({BAR_RGB, PROVISIONAL_RGB}),
) -> list[int]:
    """Heights in pixels of the chart's bars of one series (its ``colours``: processed
    and provisional), left to right.

    The bars stand on one baseline: the lowest of the rows with the most bar-coloured
    pixels (the legend's swatches share the colours but are far narrower). A bar's
    height is its run of bar-coloured pixels going up from there; bars of another
    series beside them (other colours) end a run.
    """
    widths = [sum(1 for px in row if px in colours) for row in rows]
    base = max(range(len(rows)), key=lambda y: (widths[y], y))
    heights = []
    for x in range(len(rows[0])):
        y = base
        while y >= 0 and rows[y][x] in colours:
            y -= 1
        heights.append(base - y)
    bars, run = [], 0
    for h in [*heights, 0]:
        if h:
            run = max(run, h)
        elif run:
            bars.append(run)
            run = 0
    return bars


@pytest.mark.ray
@pytest.mark.redis
def test_dashboard_draws_the_sites_day(chromium: Path, loaded: str, tmp_path: Path) -> None:
    url = loaded
    query = _query()
    with httpx.Client(base_url=url, timeout=30) as client:
        api = client.get(
            f"/v1/sites/{SITE}/traffic", params={k: v for k, v in query.items() if k != "site"}
        )
    assert api.status_code == 200, api.text
    points = api.json()["points"]
    assert [p["count"] for p in points] == HOURLY, "the API itself must give the day first"

    page = f"{url}/?{urlencode(query)}"
    dom = _run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", page).stdout
    found = _Elements()
    found.feed(dom)
    chart = found.attrs.get("chart")
    assert chart is not None, f"no canvas#chart in the page:\n{dom[:3000]}"
    message = found.text.get("msg", "").strip()
    assert "data-total" in chart, f"the chart was not drawn; page says {message!r}"
    assert int(chart["data-total"]) == sum(HOURLY)
    assert int(chart["data-points"]) == 24
    assert int(chart["data-provisional"]) == sum(p["provisional"] for p in points)
    assert message == ""
    assert "hidden" in found.attrs["auth"], "an open cluster must not ask for a token"
    # (A dumped DOM holds attributes, not the inputs' live values, so the form itself is
    # judged by the chart: it could only be drawn from the address's query.)
    assert found.text["total-pageviews"].strip() == f"{sum(HOURLY):,}"
    assert found.text["peak"].strip() == str(max(HOURLY))

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    _run_chromium(
        chromium,
        tmp_path / "profile-shot",
        f"--screenshot={shot}",
        "--window-size=1200,700",
        "--hide-scrollbars",
        page,
    )
    assert shot.exists(), "chromium wrote no screenshot"
    heights = _bars(_rgba_rows(shot.read_bytes()))
    assert len(heights) == 24, f"expected 24 bars in {shot}, saw {len(heights)}: {heights}"
    tallest = max(heights)
    # Bar heights follow the counts (to a pixel of rounding each).
    for height, count in zip(heights, HOURLY, strict=True):
        assert abs(height - tallest * count / max(HOURLY)) <= 2, (heights, HOURLY)
