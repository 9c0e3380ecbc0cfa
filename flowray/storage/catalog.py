"""The catalog of published warehouse data: versions, units, cursors, generation.

A unit is the processed output of one (shard, hour): one Parquet file. Publishing
replaces unit rows and bumps ``generation`` in one SQLite transaction, so a reader
sees all of a job or none of it, and caches keyed by the generation never serve data
from before a publish. SQLite (WAL mode) lets the Serve replicas read while the
processor writes, from any process on the machine.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, logic TEXT NOT NULL, created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS units (
    version INTEGER NOT NULL, shard INTEGER NOT NULL, hour INTEGER NOT NULL,
    path TEXT NOT NULL, parts INTEGER NOT NULL, rows INTEGER NOT NULL, events INTEGER NOT NULL,
    PRIMARY KEY (version, shard, hour)
);
CREATE TABLE IF NOT EXISTS cursors (grp INTEGER PRIMARY KEY, seal_index INTEGER NOT NULL);
"""
BUSY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Unit:
    shard: int
    hour: int
    path: str
    parts: int
    rows: int
    events: int


class Catalog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for stmt in SCHEMA.strip().split(";"):
            if stmt.strip():
                self._db.execute(stmt)
        with self._tx():
            if self._meta("current_version") is None:
                self._db.execute(
                    "INSERT INTO versions VALUES (1, 'default', ?)", (int(time.time() * 1000),)
                )
                self._set_meta("current_version", 1)
                self._set_meta("generation", 0)
                # Names this warehouse in shared caches: two clusters sharing one Redis
                # must never read each other's entries at the same generation.
                self._set_meta("identity", secrets.randbits(62))
        self.identity = f"{self._meta('identity'):016x}"

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _meta(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ---- reads -----------------------------------------------------------------------
    def generation(self) -> int:
        return self._meta("generation") or 0

    def current_version(self) -> int:
        value = self._meta("current_version")
        return 1 if value is None else value

    def watermark_ms(self) -> int | None:
        return self._meta("watermark_ms")

    def snapshot(self) -> tuple[int, int, int | None]:
        """(generation, current version, watermark) read together."""
        rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        return (
            int(rows.get("generation", 0)),
            int(rows.get("current_version", 1)),
            (None if rows.get("watermark_ms") is None else int(rows["watermark_ms"])),
        )

    def unit_paths(self, version: int, shard: int, hour_lo: int, hour_hi: int) -> list[str]:
        """Files of one shard for hours in [hour_lo, hour_hi)."""
        rows = self._db.execute(
            "SELECT path FROM units WHERE version = ? AND shard = ? AND hour >= ? AND hour < ?"
            " ORDER BY hour",
            (version, shard, hour_lo, hour_hi),
        ).fetchall()
        return [r[0] for r in rows]

    def units(self, version: int) -> list[Unit]:
        rows = self._db.execute(
            "SELECT shard, hour, path, parts, rows, events FROM units WHERE version = ?"
            " ORDER BY hour, shard",
            (version,),
        ).fetchall()
        return [Unit(*r) for r in rows]

    def cursor(self, group: int) -> int:
        row = self._db.execute("SELECT seal_index FROM cursors WHERE grp = ?", (group,)).fetchone()
        return 0 if row is None else int(row[0])

    def summary(self) -> dict[str, int | None]:
        generation, version, watermark = self.snapshot()
        n, events = self._db.execute(
            "SELECT count(*), coalesce(sum(events), 0) FROM units WHERE version = ?", (version,)
        ).fetchone()
        return {
            "generation": generation,
            "current_version": version,
            "units": int(n),
            "events": int(events),
            "watermark_ms": watermark,
        }

    # ---- writes ----------------------------------------------------------------------
    def publish(self, units: Iterable[Unit], cursors: dict[int, int]) -> int:
        """Make ``units`` current and move the group cursors, atomically; new generation."""
        with self._tx():
            version = self.current_version()
            self._db.executemany(
                "INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(version, u.shard, u.hour, u.path, u.parts, u.rows, u.events) for u in units],
            )
            for group, seal_index in cursors.items():
                self._db.execute(
                    "INSERT INTO cursors VALUES (?, ?) ON CONFLICT(grp) DO UPDATE SET"
                    " seal_index = max(seal_index, excluded.seal_index)",
                    (group, seal_index),
                )
            generation = (self._meta("generation") or 0) + 1
            self._set_meta("generation", generation)
        return generation

    def set_watermark(self, watermark_ms: int) -> None:
        with self._tx():
            if self._meta("watermark_ms") != watermark_ms:
                self._set_meta("watermark_ms", watermark_ms)
                self._set_meta("generation", (self._meta("generation") or 0) + 1)

    def close(self) -> None:
        self._db.close()
