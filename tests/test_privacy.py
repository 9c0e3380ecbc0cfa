"""No client address reaches the disk: a real cluster takes tracker events and
combined-log imports from distinctive addresses, processes everything, and then no
file under its data directory holds those addresses in any form.

The addresses come in as a tracker's clients (through a trusted proxy's
X-Forwarded-For, over both fronts) and as the first field of access-log lines
(``flowray ingest --format combined``). Every file under the data directory is then
read: raw log blocks, the write-ahead file, Parquet, the SQLite catalog and site
registry, salts, anything else. Each is searched as bytes, and what it holds in
compressed containers is searched once decoded: Arrow IPC streams (the log's pieces,
LZ4-compressed) found anywhere in a file, Parquet files column by column, gzip
members. An address is looked for as text (every spelling: compressed and exploded
IPv6, IPv4-mapped IPv6 in dotted and hex form, the hex of its bytes, its integer in
decimal), as its packed 4 or 16 bytes in both byte orders, and IPv4 as the 16 bytes of
its IPv4-mapped IPv6 address.

A coincidental match of a 4-byte needle in random bytes (hashes, salts, compressed
pages) has a chance of about size/2^32 per file; a failure names the file, the form
and the offset, so a coincidence is told from a leak at a glance.

Ray's own session logs live under /tmp/ray, outside the data directory, and are not
searched: they are Ray's, and flowray never logs an address on purpose.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import ipaddress
import os
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowray.config import Settings
from tests.helpers import cluster_settings, running_cluster
from tests.tracker_page.api import (
    TRACKER_ROUTES,
    poll,
    register_site,
    require_routes,
    send_event,
    tracker_event,
    wait_until_known,
)

SITE = "private.example"
ADDRESSES = ("203.0.113.77", "2001:db8::1234")
# Other spellings of the same clients that a proxy or a log may use.
SPELLINGS = {
    "203.0.113.77": ("203.0.113.77", "::ffff:203.0.113.77"),
    "2001:db8::1234": ("2001:db8::1234", "2001:0DB8:0000:0000:0000:0000:0000:1234"),
}
# X-Forwarded-For as proxies write it: the client alone, behind further trusted
# proxies, after an address the client made up, with a port, in other spellings.
FORWARDED_FOR = (
    "203.0.113.77",
    "::ffff:203.0.113.77",
    "198.51.100.1, 203.0.113.77",
    "2001:db8::1234",
    "[2001:db8::1234]:443",
    "2001:0DB8::1234, 127.0.0.1",
)
KNOWN_TIMEOUT_S = 30.0
CANARY = "/privacy-canary"  # a path every event carries, so the search is known to see data
COUNTS_TIMEOUT_S = 60.0
FLOWRAY = Path(sys.executable).parent / "flowray"


# --------------------------------------------------------------------------- needles


@dataclass(frozen=True)
class Needle:
    data: bytes
    form: str
    text: bool  # searched in a lower-cased copy (text forms are lower case)


def needles(address: str) -> list[Needle]:
    """Every byte string that would give ``address`` away, named by its form."""
    ip = ipaddress.ip_address(address)
    text = [
        (ip.compressed, "text"),
        (ip.exploded, "exploded text"),
        (ip.packed.hex(), "hex of the packed bytes"),
        (str(int(ip)), "integer in decimal"),
    ]
    packed = [(ip.packed, f"packed {len(ip.packed)} bytes"), (ip.packed[::-1], "packed, reversed")]
    if isinstance(ip, ipaddress.IPv4Address):
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
        text += [
            (f"::ffff:{ip}", "IPv4-mapped text"),
            (mapped.compressed, "IPv4-mapped hex text"),
            (mapped.exploded, "IPv4-mapped exploded text"),
        ]
        packed += [
            (mapped.packed, "IPv4-mapped packed 16 bytes"),
            (mapped.packed[::-1], "IPv4-mapped packed, reversed"),
            (int(ip).to_bytes(8, "little"), "integer, 8 bytes little-endian"),
            (int(ip).to_bytes(8, "big"), "integer, 8 bytes big-endian"),
        ]
    found: dict[bytes, Needle] = {}
    for value, form in text:
        found.setdefault(value.lower().encode(), Needle(value.lower().encode(), form, True))
    for data, form in packed:
        found.setdefault(data, Needle(data, form, False))
    return list(found.values())


def test_needles_cover_the_forms() -> None:
    four = {n.data for n in needles("203.0.113.77")}
    assert b"203.0.113.77" in four and b"\xcb\x00\x71\x4d" in four
    assert b"::ffff:cb00:714d" in four and b"::ffff:203.0.113.77" in four
    assert bytes(10) + b"\xff\xff\xcb\x00\x71\x4d" in four
    six = {n.data for n in needles("2001:db8::1234")}
    assert b"2001:0db8:0000:0000:0000:0000:0000:1234" in six
    assert bytes.fromhex("20010db8000000000000000000001234") in six


def test_the_search_finds_an_address_in_each_container(tmp_path: Path) -> None:
    """The search itself: an address hidden in LZ4-compressed Arrow IPC, in compressed
    Parquet, in gzip and as packed bytes is found; a clean tree is clean."""
    table = pa.table({"visitor": ["2001:DB8::1234"], "path": [CANARY]})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    (tmp_path / "framed.seg").write_bytes(b"header" + sink.getvalue().to_pybytes() + b"tail")
    pq.write_table(pa.table({"ip": ["203.0.113.77"] * 100}), tmp_path / "f.parquet",
                   compression="zstd")  # fmt: skip
    (tmp_path / "log.gz").write_bytes(gzip.compress(b"client ::FFFF:CB00:714D"))
    (tmp_path / "packed.bin").write_bytes(b"\x00" + bytes.fromhex("cb00714d") + b"\x00")
    (tmp_path / "clean.txt").write_bytes(b"203.0.113.7 2001:db8::123")
    found = search_tree(tmp_path)
    where = {(leak.where, leak.kind) for leak in found.leaks}
    assert {
        ("f.parquet", "Parquet"),
        ("framed.seg @ 6", "Arrow IPC"),
        ("log.gz", "gzip"),
        ("packed.bin", "raw bytes"),
    } <= where, found.leaks
    assert not any(leak.where == "clean.txt" for leak in found.leaks), found.leaks
    assert found.ipc_streams == 1 and found.parquet_files == 1
    assert "Arrow IPC" in found.canary_in


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Leak:
    where: str  # the file, and the offset of a decoded stream in it
    kind: str  # raw bytes, or the container decoded
    address: str
    form: str
    offset: int

    def __str__(self) -> str:
        return f"{self.where}: {self.address} as {self.form} at {self.offset} ({self.kind})"


@dataclass
class Found:
    """Where the addresses were found, and how much decoded data the search saw."""

    leaks: list[Leak] = field(default_factory=list)
    files: int = 0
    ipc_streams: int = 0
    parquet_files: int = 0
    canary_in: set[str] = field(default_factory=set)  # containers holding CANARY

    def report(self, shown_max: int = 20) -> str:
        lines = [str(leak) for leak in self.leaks[:shown_max]]
        more = len(self.leaks) - shown_max
        return "\n".join(
            [f"client addresses on disk, {len(self.leaks)} times:", *lines]
            + ([f"... and {more} more"] if more > 0 else [])
        )

    def search(self, data: bytes, where: str, kind: str) -> None:
        lowered = data.lower()
        for address in ADDRESSES:
            for needle in needles(address):
                at = (lowered if needle.text else data).find(needle.data)
                if at >= 0:
                    self.leaks.append(Leak(where, kind, address, needle.form, at))
        if CANARY.encode() in data:
            self.canary_in.add(kind)


def _ipc_streams(data: bytes) -> Iterator[tuple[int, pa.Table]]:
    """Every Arrow IPC stream in ``data``, wherever it starts (the log frames pieces in
    records and write-ahead batches; the search does not need to know those formats)."""
    marker = b"\xff\xff\xff\xff"
    at = data.find(marker)
    while at >= 0:
        try:
            table = pa.ipc.open_stream(pa.BufferReader(data[at:])).read_all()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
            table = None
        if table is not None and table.num_columns:
            yield at, table
        at = data.find(marker, at + 1)


def _table_bytes(table: pa.Table) -> bytes:
    """A table's values as text, one per line (strings as they are, others as repr)."""
    lines = []
    for column in table.columns:
        for value in column.to_pylist():
            if value is not None:
                lines.append(value if isinstance(value, str) else repr(value))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def search_file(path: Path, root: Path, found: Found) -> None:
    data = path.read_bytes()
    where = str(path.relative_to(root))
    found.files += 1
    found.search(data, where, "raw bytes")
    for at, table in _ipc_streams(data):
        found.ipc_streams += 1
        found.search(_table_bytes(table), f"{where} @ {at}", "Arrow IPC")
    if data[:4] == b"PAR1":
        found.parquet_files += 1
        found.search(_table_bytes(pq.read_table(io.BytesIO(data))), where, "Parquet")
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError, zlib.error):
            found.search(gzip.decompress(data), where, "gzip")


def search_tree(root: Path) -> Found:
    found = Found()
    for directory, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                search_file(path, root, found)
    return found


# --------------------------------------------------------------------------- cluster


def combined_log(now: datetime) -> str:
    """Access-log lines from each spelling of each address: today, and three days ago
    (a day whose salt is gone: the import's own salt applies)."""
    lines = []
    for n, spelling in enumerate(s for spellings in SPELLINGS.values() for s in spellings):
        for when in (now - timedelta(minutes=30 + n), now - timedelta(days=3, minutes=n)):
            stamp = when.strftime("%d/%b/%Y:%H:%M:%S +0000")
            lines.append(
                f'{spelling} - - [{stamp}] "GET {CANARY}/log/{n} HTTP/1.1" 200 512 '
                f'"https://referrer.example/" "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) '
                f'Gecko/20100101 Firefox/127.0"'
            )
    return "\n".join(lines) + "\n"


def _traffic_total(client: httpx.Client, start: datetime, end: datetime) -> int:
    answer = client.get(
        f"/v1/sites/{SITE}/traffic",
        params={"start": start.isoformat(), "end": end.isoformat(), "interval": "day"},
    )
    assert answer.status_code == 200, answer.text
    return sum(int(p["count"]) for p in answer.json()["points"])


Feed = Callable[[httpx.Client, Settings, Path], int]


def _run_then_search(
    serve_port: int, redis_url: str, tmp_path: Path, name: str, feed: Feed, **overrides: Any
) -> Found:
    """Run a cluster, ``feed`` it (it returns how many events it sent), process
    everything, check that all of them are counted, stop the cluster, search its data."""
    data_dir = tmp_path / "data"
    settings = cluster_settings(
        data_dir, serve_port, redis_url, f"flowray-privacy-{name}", **overrides
    )
    now = datetime.now(UTC)
    with (
        running_cluster(settings) as (_running, url),
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        sent = feed(client, settings, tmp_path)
        processed = client.post("/v1/admin/process", params={"mode": "all"})
        assert processed.status_code == 200, processed.text
        start, end = now - timedelta(days=4), now + timedelta(days=1)
        total = poll(
            lambda: _traffic_total(client, start, end), lambda n: n >= sent, COUNTS_TIMEOUT_S
        )
        assert total == sent, "every event sent must be counted, or the search proves little"
    found = search_tree(data_dir)
    assert found.parquet_files > 0 and found.ipc_streams > 0, found
    assert "Arrow IPC" in found.canary_in, "the search must see the log's decoded events"
    return found


@pytest.mark.ray
def test_a_combined_log_import_stores_no_address(
    ray_session: None, redis_url: str, serve_port: int, tmp_path: Path
) -> None:
    def feed(client: httpx.Client, settings: Settings, tmp: Path) -> int:
        log_file = tmp / "access.log"
        log_file.write_text(combined_log(datetime.now(UTC)))
        imported = subprocess.run(
            [str(FLOWRAY), "ingest", "--url", str(client.base_url), "--format", "combined",
             "--site", SITE, str(log_file)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert imported.returncode == 0, imported.stdout + imported.stderr
        return len(log_file.read_text().splitlines())

    found = _run_then_search(serve_port, redis_url, tmp_path, "log", feed)
    assert not found.leaks, found.report()


@pytest.mark.ray
def test_tracker_events_store_no_address(
    ray_session: None, redis_url: str, serve_port: int, tmp_path: Path
) -> None:
    def feed(client: httpx.Client, settings: Settings, tmp: Path) -> int:
        require_routes(client, TRACKER_ROUTES)
        register_site(client, SITE)
        return _send_tracker_events(
            str(client.base_url), f"http://127.0.0.1:{settings.ingest_port}"
        )

    found = _run_then_search(
        serve_port,
        redis_url,
        tmp_path,
        "tracker",
        feed,
        trusted_proxies="127.0.0.1,::1",
        sites_reload_s=0.2,
    )
    assert not found.leaks, found.report()


def _send_tracker_events(url: str, ingest_url: str) -> int:
    """A page view and a custom event from each spelling of each address, through both
    fronts; the number of counted events sent."""
    sent = 0
    for front in (url, ingest_url):
        with httpx.Client(base_url=front, timeout=30) as client:
            wait_until_known(client, SITE, KNOWN_TIMEOUT_S)
            for n, forwarded in enumerate(FORWARDED_FOR):
                page = f"https://{SITE}{CANARY}/tracker/{n}?utm_source=privacy"
                for body in (
                    tracker_event(SITE, page),
                    tracker_event(SITE, page, name="Signup", plan="pro"),
                ):
                    answer = send_event(client, body, forwarded_for=forwarded)
                    assert answer.status_code == 202, (front, answer.status_code, answer.text)
                    sent += 1
    return sent
