"""The registry of sites: which sites ``POST /api/event`` takes events for, and each
site's time zone.

A tracker endpoint needs no token (a page's script cannot keep a secret), so the
registry is what stops anyone from filling the cluster with made-up sites. It is a
small SQLite table in the warehouse directory (``sites.sqlite``, on the storage every
node mounts, like the catalog), written by the admin routes and ``flowray sites``
and read by every front end.

Fronts do not read the table per request: :class:`SiteRegistry` keeps a snapshot,
refreshed at most every ``sites_reload_s`` on a worker thread with a timeout, so a
slow or locked file never holds the event loop; a store that cannot be read leaves
the last snapshot in place. A site added on one front is therefore taken by the
others within ``sites_reload_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowray.core.router import SiteError, normalize_site
from flowray.query.series import RangeError, parse_zone
from flowray.storage.durable import make_dirs_durably

log = logging.getLogger(__name__)

SITES_FILE = "sites.sqlite"
SITES_MAX = 100_000  # a front holds every registered site in memory
STORE_TIMEOUT_S = 1.0  # SQLite's busy timeout: a writer holds the file at most this long
READ_TIMEOUT_S = 2.0  # how long a front waits for a refresh before keeping its snapshot
DEFAULT_TIMEZONE = "UTC"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites (
    domain TEXT PRIMARY KEY,
    timezone TEXT NOT NULL,
    added_ms INTEGER NOT NULL
)
"""


class SitesUnavailable(RuntimeError):
    """The registry cannot be read or written (locked too long, corrupt, unreadable)."""


class SiteExists(ValueError):
    """A site registered already, with another time zone."""


@dataclass(frozen=True)
class Site:
    domain: str
    timezone: str
    added_ms: int

    def public(self) -> dict[str, Any]:
        return {"domain": self.domain, "timezone": self.timezone, "added_ms": self.added_ms}


def sites_file(warehouse_dir: Path) -> Path:
    return Path(warehouse_dir) / SITES_FILE


def check_site(domain: str, timezone: str = DEFAULT_TIMEZONE) -> tuple[str, str]:
    """The normalized domain and the checked IANA zone; ValueError saying what is wrong.

    Domains are normalized as ingest and routing normalize them, so ``Shop.Example.``
    registers the site whose events say ``shop.example``.
    """
    try:
        normalized = normalize_site(domain)
    except SiteError as exc:
        raise ValueError(f"domain: {exc}") from None
    try:
        parse_zone(timezone)
    except RangeError as exc:
        raise ValueError(f"timezone: {exc}") from None
    return normalized, timezone


class SiteStore:
    """Sites in ``WAREHOUSE/sites.sqlite`` (WAL: the CLI and the admin routes write
    while fronts read).

    Every call opens its own short connection, so the store is safe from any thread or
    process; a missing file is an empty registry (reading never creates it).
    """

    def __init__(self, path: Path, timeout_s: float = STORE_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s)
        except sqlite3.Error as exc:
            raise SitesUnavailable(f"site registry {self.path}: {exc}") from exc
        try:
            with conn:
                yield conn
        except sqlite3.Error as exc:
            raise SitesUnavailable(f"site registry {self.path}: {exc}") from exc
        finally:
            conn.close()

    def _create_schema(self) -> None:
        make_dirs_durably(self.path.parent)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def sites(self) -> list[Site]:
        """Every registered site, by domain."""
        if not self.path.exists():
            return []
        with self._connect() as conn:
            try:
                rows = conn.execute(
                    "SELECT domain, timezone, added_ms FROM sites ORDER BY domain LIMIT ?",
                    (SITES_MAX,),
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise SitesUnavailable(f"site registry {self.path}: {exc}") from exc
        return [Site(*row) for row in rows]

    def add(
        self, domain: str, timezone: str = DEFAULT_TIMEZONE, now_ms: int | None = None
    ) -> tuple[Site, bool]:
        """Register a site; returns it and whether it is new. The same site again with
        the same zone is no change; with another, :class:`SiteExists` (remove it first:
        a zone is how its days are cut, so changing it is a decision, not a retry)."""
        domain, timezone = check_site(domain, timezone)
        self._create_schema()
        added_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._connect() as conn:
            row = conn.execute(
                "SELECT domain, timezone, added_ms FROM sites WHERE domain = ?", (domain,)
            ).fetchone()
            if row is not None:
                site = Site(*row)
                if site.timezone != timezone:
                    raise SiteExists(
                        f"site {domain} is registered already, in time zone {site.timezone}; "
                        "remove it first to change its zone"
                    )
                return site, False
            (count,) = conn.execute("SELECT count(*) FROM sites").fetchone()
            if count >= SITES_MAX:
                raise ValueError(f"the registry holds {SITES_MAX} sites; remove some first")
            conn.execute("INSERT INTO sites VALUES (?, ?, ?)", (domain, timezone, added_ms))
        return Site(domain, timezone, added_ms), True

    def remove(self, domain: str) -> Site | None:
        """Unregister a site (its stored events stay); None when it is not registered."""
        domain, _ = check_site(domain)
        if not self.path.exists():
            return None
        with self._connect() as conn:
            try:
                row = conn.execute(
                    "SELECT domain, timezone, added_ms FROM sites WHERE domain = ?", (domain,)
                ).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return None
                raise SitesUnavailable(f"site registry {self.path}: {exc}") from exc
            if row is None:
                return None
            conn.execute("DELETE FROM sites WHERE domain = ?", (domain,))
        return Site(*row)


@dataclass(frozen=True)
class Snapshot:
    """The registered sites as a front last read them."""

    by_domain: dict[str, Site] = field(default_factory=dict)

    def unknown(self, domains: Iterable[str]) -> list[str]:
        """The normalized ``domains`` that are not registered."""
        return [d for d in domains if d not in self.by_domain]


class SiteRegistry:
    """A front's view of the store: a snapshot, re-read at most every ``reload_s`` on a
    worker thread (the store is SQLite on shared storage: a read can stall).

    Only the very first read is waited for (up to ``read_timeout_s``); later ones run
    in the background while requests use the snapshot they replace. A failed read keeps
    the last snapshot and is retried after ``reload_s``.
    """

    def __init__(
        self,
        store: SiteStore,
        reload_s: float,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.reload_s = reload_s
        self.read_timeout_s = read_timeout_s
        self.clock = clock
        self._snapshot: Snapshot | None = None
        self._read_s: float | None = None
        self._reading: asyncio.Task[None] | None = None
        self._changes = 0  # this front's own writes, counted (see changed)

    @classmethod
    def in_warehouse(cls, warehouse_dir: Path, reload_s: float) -> SiteRegistry:
        return cls(SiteStore(sites_file(warehouse_dir)), reload_s)

    async def snapshot(self) -> Snapshot:
        """The current snapshot; :class:`SitesUnavailable` if none was ever read."""
        due = self._read_s is None or self.clock() - self._read_s >= self.reload_s
        if due and (self._reading is None or self._reading.done()):
            self._read_s = self.clock()
            self._reading = asyncio.ensure_future(self._read())
        if self._snapshot is None and self._reading is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reading), self.read_timeout_s)
        if self._snapshot is None:
            raise SitesUnavailable("the site registry could not be read yet; retry shortly")
        return self._snapshot

    def timezone_of(self, domain: str) -> str | None:
        """A registered site's zone from the last snapshot, without waiting (for code that
        cannot await); None for a site not registered or not read yet."""
        site = None if self._snapshot is None else self._snapshot.by_domain.get(domain)
        return None if site is None else site.timezone

    def changed(self, added: Site | None = None, removed: str | None = None) -> None:
        """This front wrote to the store: its own requests see the change at once, and a
        read that began before the write is not taken (it may not hold the change)."""
        self._changes += 1
        self._read_s = None
        if self._snapshot is not None:
            by_domain = dict(self._snapshot.by_domain)
            if added is not None:
                by_domain[added.domain] = added
            if removed is not None:
                by_domain.pop(removed, None)
            self._snapshot = Snapshot(by_domain)

    async def _read(self) -> None:
        changes = self._changes
        try:
            sites = await asyncio.wait_for(asyncio.to_thread(self.store.sites), self.read_timeout_s)
        except (SitesUnavailable, TimeoutError) as exc:
            log.warning("keeping the last known sites: %s", exc or "the read timed out")
            return
        if changes == self._changes or self._snapshot is None:
            self._snapshot = Snapshot({s.domain: s for s in sites})
