"""The catalog of published warehouse data: versions, units, cursors, generation.

A unit is the processed output of one (shard, hour): one Parquet file. Publishing
replaces unit rows and bumps ``generation`` in one SQLite transaction, so a reader
sees all of a job or none of it, and caches keyed by the generation never serve data
from before a publish. SQLite (WAL mode) lets the Serve replicas read while the
processor writes, from any process on the machine.

A version is a complete set of units made by one processing logic. Version 1 is made
by ``default``; a re-processing run creates a child version (its parent's units, with
the re-processed ones replaced) and makes it current in the same transaction that
publishes it; a rollback makes the parent current again. Regular processing always
publishes into the current version.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flowray.core.router import ShardMap
from flowray.core.units import DAY_HOURS
from flowray.storage.durable import make_dirs_durably

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
CREATE TABLE IF NOT EXISTS merged (
    version INTEGER NOT NULL, shard INTEGER NOT NULL, day INTEGER NOT NULL,
    path TEXT NOT NULL, rows INTEGER NOT NULL, events INTEGER NOT NULL,
    PRIMARY KEY (version, shard, day)
);
CREATE TABLE IF NOT EXISTS shard_moves (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, shard INTEGER NOT NULL,
    from_grp INTEGER NOT NULL, to_grp INTEGER NOT NULL, at_ms INTEGER NOT NULL
);
"""
# Columns added to ``versions`` after the first release, added to older catalogs on open.
VERSION_COLUMNS = {
    "parent": "INTEGER",
    "modules": "TEXT NOT NULL DEFAULT ''",
    "note": "TEXT NOT NULL DEFAULT ''",
}
BUSY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Unit:
    shard: int
    hour: int
    path: str
    parts: int
    rows: int
    events: int


@dataclass(frozen=True)
class Version:
    version: int
    logic: str
    modules: tuple[str, ...]
    parent: int | None
    created_ms: int
    note: str
    current: bool
    units: int
    events: int

    def to_json(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["modules"] = list(self.modules)
        return out


class CatalogError(ValueError):
    """A catalog operation that cannot be done (unknown version, nothing to roll back to)."""


class Catalog:
    def __init__(self, path: Path) -> None:
        make_dirs_durably(path.parent)
        self.path = path
        self._db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for stmt in SCHEMA.strip().split(";"):
            if stmt.strip():
                self._db.execute(stmt)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(versions)").fetchall()}
        for column, decl in VERSION_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE versions ADD COLUMN {column} {decl}")
        with self._tx():
            if self._meta("current_version") is None:
                self._db.execute(
                    "INSERT INTO versions (version, logic, created_ms, note)"
                    " VALUES (1, 'default', ?, 'first version')",
                    (_now_ms(),),
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
        """Files of one shard for hours in [hour_lo, hour_hi): a day's merged file where
        there is one (it holds all of that day's units), else the hourly files."""
        day_lo, day_hi = hour_lo // DAY_HOURS, -(-hour_hi // DAY_HOURS)
        merged = dict(
            self._db.execute(
                "SELECT day, path FROM merged WHERE version = ? AND shard = ? AND day >= ?"
                " AND day < ?",
                (version, shard, day_lo, day_hi),
            ).fetchall()
        )
        rows = self._db.execute(
            "SELECT hour, path FROM units WHERE version = ? AND shard = ? AND hour >= ?"
            " AND hour < ? ORDER BY hour",
            (version, shard, hour_lo, hour_hi),
        ).fetchall()
        hourly = [path for hour, path in rows if hour // DAY_HOURS not in merged]
        return [merged[d] for d in sorted(merged)] + hourly

    def mergeable_days(self, version: int, before_hour: int, limit: int) -> list[tuple[int, int]]:
        """(shard, day) of days wholly before ``before_hour`` with two or more units and
        no merged file yet, oldest first."""
        rows = self._db.execute(
            "SELECT u.shard, u.hour / ? AS day FROM units u WHERE u.version = ?"
            " AND u.hour < ? GROUP BY u.shard, day HAVING count(*) > 1"
            " AND NOT EXISTS (SELECT 1 FROM merged m WHERE m.version = u.version"
            "  AND m.shard = u.shard AND m.day = u.hour / ?)"
            " ORDER BY day, u.shard LIMIT ?",
            (DAY_HOURS, version, before_hour // DAY_HOURS * DAY_HOURS, DAY_HOURS, limit),
        ).fetchall()
        return [(int(a), int(b)) for a, b in rows]

    def day_units(self, version: int, shard: int, day: int) -> list[Unit]:
        rows = self._db.execute(
            "SELECT shard, hour, path, parts, rows, events FROM units WHERE version = ?"
            " AND shard = ? AND hour >= ? AND hour < ? ORDER BY hour",
            (version, shard, day * DAY_HOURS, (day + 1) * DAY_HOURS),
        ).fetchall()
        return [Unit(*r) for r in rows]

    def units(self, version: int) -> list[Unit]:
        rows = self._db.execute(
            "SELECT shard, hour, path, parts, rows, events FROM units WHERE version = ?"
            " ORDER BY hour, shard",
            (version,),
        ).fetchall()
        return [Unit(*r) for r in rows]

    def unit_map(self, version: int) -> dict[tuple[int, int], Unit]:
        return {(u.shard, u.hour): u for u in self.units(version)}

    def versions(self) -> list[Version]:
        return self._versions("", ())

    def version(self, version: int | None = None) -> Version:
        """One version (the current one by default)."""
        wanted = self.current_version() if version is None else version
        found = self._versions("WHERE v.version = ?", (wanted,))
        if not found:
            raise CatalogError(f"no warehouse version {wanted}")
        return found[0]

    def _versions(self, where: str, args: tuple[int, ...]) -> list[Version]:
        current = self.current_version()
        rows = self._db.execute(
            "SELECT v.version, v.logic, v.modules, v.parent, v.created_ms, v.note,"
            " count(u.hour), coalesce(sum(u.events), 0)"
            f" FROM versions v LEFT JOIN units u ON u.version = v.version {where}"
            " GROUP BY v.version ORDER BY v.version",
            args,
        ).fetchall()
        return [
            Version(
                version=int(r[0]),
                logic=r[1],
                modules=tuple(m for m in r[2].split(",") if m),
                parent=None if r[3] is None else int(r[3]),
                created_ms=int(r[4]),
                note=r[5],
                current=int(r[0]) == current,
                units=int(r[6]),
                events=int(r[7]),
            )
            for r in rows
        ]

    def shard_moves(self) -> list[tuple[int, int, int]]:
        """(shard, from group, to group) of every move, oldest first."""
        rows = self._db.execute(
            "SELECT shard, from_grp, to_grp FROM shard_moves ORDER BY seq"
        ).fetchall()
        return [(int(a), int(b), int(c)) for a, b, c in rows]

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
    def publish(
        self, units: Iterable[Unit], cursors: dict[int, int], version: int | None = None
    ) -> int:
        """Make ``units`` current and move the group cursors, atomically; new generation.

        With ``version``, refused unless that is still the current version (the units
        were made with its logic).
        """
        with self._tx():
            if version is not None and self.current_version() != version:
                raise CatalogError(
                    f"version {version} is no longer current ({self.current_version()} is)"
                )
            self._put_units(self.current_version(), units)
            for group, seal_index in cursors.items():
                self._db.execute(
                    "INSERT INTO cursors VALUES (?, ?) ON CONFLICT(grp) DO UPDATE SET"
                    " seal_index = max(seal_index, excluded.seal_index)",
                    (group, seal_index),
                )
            generation = (self._meta("generation") or 0) + 1
            self._set_meta("generation", generation)
        return generation

    def create_version(
        self,
        parent: int,
        logic: str,
        modules: tuple[str, ...],
        units: Iterable[Unit],
        note: str,
    ) -> tuple[int, int]:
        """A child of ``parent`` with ``units`` replaced, made current atomically.

        Returns (new version, new generation). Refused if ``parent`` is no longer the
        current version: the re-processing run read a version that has been replaced.
        """
        with self._tx():
            if self.current_version() != parent:
                raise CatalogError(
                    f"version {parent} is no longer current ({self.current_version()} is)"
                )
            version = int(
                self._db.execute("SELECT coalesce(max(version), 0) + 1 FROM versions").fetchone()[0]
            )
            self._db.execute(
                "INSERT INTO versions (version, logic, created_ms, parent, modules, note)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (version, logic, _now_ms(), parent, ",".join(modules), note),
            )
            self._db.execute(
                "INSERT INTO units SELECT ?, shard, hour, path, parts, rows, events"
                " FROM units WHERE version = ?",
                (version, parent),
            )
            self._db.execute(
                "INSERT INTO merged SELECT ?, shard, day, path, rows, events"
                " FROM merged WHERE version = ?",
                (version, parent),
            )
            self._put_units(version, units)
            self._set_meta("current_version", version)
            generation = (self._meta("generation") or 0) + 1
            self._set_meta("generation", generation)
        return version, generation

    def switch(self, expected_current: int, target: int, units: Iterable[Unit]) -> int:
        """Make ``target`` current with ``units`` brought up to date in it; new generation.

        Used by rollback: ``units`` are those the current version published after
        ``target`` stopped being current, re-made with ``target``'s logic.
        """
        with self._tx():
            if self.current_version() != expected_current:
                raise CatalogError(
                    f"version {expected_current} is no longer current ({self.current_version()} is)"
                )
            known = self._db.execute("SELECT 1 FROM versions WHERE version = ?", (target,))
            if known.fetchone() is None:
                raise CatalogError(f"no warehouse version {target}")
            self._put_units(target, units)
            self._set_meta("current_version", target)
            generation = (self._meta("generation") or 0) + 1
            self._set_meta("generation", generation)
        return generation

    def _put_units(self, version: int, units: Iterable[Unit]) -> None:
        rows = [(version, u.shard, u.hour, u.path, u.parts, u.rows, u.events) for u in units]
        self._db.executemany("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        # A day's merged file no longer holds what the day's units say: read the hours.
        self._db.executemany(
            "DELETE FROM merged WHERE version = ? AND shard = ? AND day = ?",
            sorted({(version, r[1], r[2] // DAY_HOURS) for r in rows}),
        )

    def add_merged(
        self, version: int, shard: int, day: int, made_from: list[str], unit: Unit
    ) -> bool:
        """Record ``unit`` (a file of the whole day) as the merge of ``made_from``, the
        day's unit files it was made from; refused (False) if those changed meanwhile."""
        with self._tx():
            now = [u.path for u in self.day_units(version, shard, day)]
            if sorted(now) != sorted(made_from):
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO merged VALUES (?, ?, ?, ?, ?, ?)",
                (version, shard, day, unit.path, unit.rows, unit.events),
            )
        # No new generation: the merged file answers exactly what the hours did, so
        # cached answers stay right.
        return True

    def move_shard(self, shard: int, from_group: int, to_group: int) -> None:
        """Record that ``shard``'s new writes go to ``to_group`` from now on. Its older
        blocks stay in the groups that wrote them; processing reads every group that
        ever owned the shard (see flowray.core.router.ShardMap.with_moves)."""
        with self._tx():
            self._db.execute(
                "INSERT INTO shard_moves (shard, from_grp, to_grp, at_ms) VALUES (?, ?, ?, ?)",
                (shard, from_group, to_group, _now_ms()),
            )

    def set_watermark(self, watermark_ms: int) -> None:
        with self._tx():
            if self._meta("watermark_ms") != watermark_ms:
                self._set_meta("watermark_ms", watermark_ms)
                self._set_meta("generation", (self._meta("generation") or 0) + 1)

    def close(self) -> None:
        self._db.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


class LiveShardMap:
    """The shard map as the catalog says now, re-read at most once per ``ttl_s``: what
    ingest processes route by, so a shard move reaches them within a second."""

    def __init__(
        self,
        base: ShardMap,
        catalog: Catalog,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base, self.catalog, self.ttl_s, self.clock = base, catalog, ttl_s, clock
        self._map = base.with_moves(catalog.shard_moves())
        self._read_at = clock()

    def __call__(self) -> ShardMap:
        now = self.clock()
        if now - self._read_at >= self.ttl_s:
            self._read_at = now
            self._map = self.base.with_moves(self.catalog.shard_moves())
        return self._map
