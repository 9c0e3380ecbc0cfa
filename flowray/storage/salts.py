"""The daily secret salts of visitor ids: one file per UTC day, deleted after a day.

A visitor id (:mod:`flowray.ingest.visitors_id`) is a keyed hash of the client's
address, so the salt is what keeps it from being an address in disguise: while a
day's salt exists its ids could be linked back by trying addresses, and once it is
deleted they cannot, not even by flowray. So salts live only as long as they are
needed, and a day's salt, once deleted, is never made again (a new one would split
that day's visitors in two).

The window, in UTC days, around the store's clock's today:

- today: created on first use;
- tomorrow: may be created too, for a process whose clock runs a little ahead at
  midnight, so that every process agrees on the salt whichever reaches the day first;
- yesterday: read, never created, for events that belong to it but arrive (or are
  imported) after midnight. An event is therefore hashed with its own day's salt until
  the end of the next UTC day, 24 to 48 hours after it happened;
- anything older: :class:`SaltExpired`, whether it was deleted or never existed
  (log imports then use :class:`ImportSalts`'s per-import salt instead).

:meth:`SaltStore.rotate` deletes every salt older than yesterday, and the store
rotates by itself on the first use of each new day; so the directory holds at most
three salts (yesterday, today, tomorrow) plus any a clock running days ahead made,
until they age out. It also records the oldest day still allowed (``floor.json``), so a
clock that goes back cannot make a deleted day's salt again.

Several processes share the directory. A salt is written in full to a temporary file
(``O_EXCL``, mode 0600) and flushed, then published under its day's name by
``link()``, which, like ``O_EXCL``, fails if the name exists: two processes never
publish two salts for one day (the loser reads the winner's), and a reader never sees
a half-written one. A salt file holds the 32 raw bytes of ``secrets.token_bytes`` and
nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from flowray.storage.durable import fsync_path, make_dirs_durably, replace_durably

SALT_BYTES = 32
DAYS_BEHIND = 1  # yesterday stays readable
DAYS_AHEAD = 1  # tomorrow may be created
FILE_MODE = 0o600
DIR_MODE = 0o700
FLOOR_FILE = "floor.json"
# A salt, or a temporary file (a salt or a floor being written) named by its day.
_NAME = re.compile(r"\.?(\d{4}-\d{2}-\d{2})(\.salt|\.[0-9a-f]{16}\.(?:tmp|floor))")
_IMPORT_PERSON = b"flowray-import-1"  # BLAKE2b personalization of per-import salts


class SaltError(Exception):
    """A salt that cannot be had: a day too far ahead, a damaged file."""


class SaltExpired(SaltError):
    """A day before the window: its salt is deleted (or was never made) and is never
    made again. A log import uses its own per-import salt for such a day."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _salt_name(day: date) -> str:
    return f"{day.isoformat()}.salt"


class SaltStore:
    """The salts of a directory (e.g. DATA_DIR/salts/), shared by every process.

    ``clock_ms`` gives epoch milliseconds; its UTC date is today. Salts read are kept
    in memory while they are in the window, and forgotten as it moves on.
    """

    def __init__(self, directory: Path, clock_ms: Callable[[], int] = _now_ms) -> None:
        self.directory = Path(directory)
        self.clock_ms = clock_ms
        self._cache: dict[date, bytes] = {}
        self._rotated_for: date | None = None

    def today(self) -> date:
        return datetime.fromtimestamp(self.clock_ms() / 1000, UTC).date()

    def window(self) -> tuple[date, date]:
        """The first and last day a salt may be asked for now (both included)."""
        today = self.today()
        return today - timedelta(days=DAYS_BEHIND), today + timedelta(days=DAYS_AHEAD)

    def salt_for(self, day: date) -> bytes:
        """The salt of ``day``, made if it is today or tomorrow and does not exist yet.

        :class:`SaltExpired` for a day before yesterday, or a yesterday without a salt
        (past days are never made); :class:`SaltError` for a day after tomorrow.
        """
        today = self.today()
        first, last = today - timedelta(days=DAYS_BEHIND), today + timedelta(days=DAYS_AHEAD)
        if day > last:
            raise SaltError(f"no salt for {day} yet: the last day with one is {last}")
        if day < first:
            raise SaltExpired(f"the salt of {day} is deleted: the first day with one is {first}")
        if self._rotated_for != today:
            self.rotate(today)
        salt = self._cache.get(day)
        if salt is None:
            salt = self._read(day)
            if salt is None:
                if day < today:
                    raise SaltExpired(f"no salt was kept for {day}, and past days get none")
                salt = self._create(day)
            self._cache[day] = salt
        return salt

    def rotate(self, today: date | None = None) -> list[date]:
        """Delete every salt (and leftover temporary file) older than yesterday and
        return the days whose salts went. The floor is recorded first, so a process
        that makes an old day's salt meanwhile sees it and takes its file back."""
        today = self.today() if today is None else today
        floor = today - timedelta(days=DAYS_BEHIND)
        self._raise_floor(floor)
        deleted: list[date] = []
        for path, day in self._files():
            if day < floor:
                path.unlink(missing_ok=True)
                if path.suffix == ".salt":
                    deleted.append(day)
        if deleted:
            fsync_path(self.directory)
        for day in [d for d in self._cache if d < floor]:
            del self._cache[day]
        self._rotated_for = today
        return sorted(deleted)

    def days(self) -> list[date]:
        """The days that have a salt on disk."""
        return sorted(day for path, day in self._files() if path.suffix == ".salt")

    def floor(self) -> date | None:
        """The oldest day a salt may still exist for, as the last rotation set it."""
        try:
            text = (self.directory / FLOOR_FILE).read_text()
        except FileNotFoundError:
            return None
        return date.fromisoformat(json.loads(text)["floor"])

    # ----------------------------------------------------------------- files

    def _files(self) -> list[tuple[Path, date]]:
        """The salts and temporary files, with their days."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.fullmatch(path.name)
            if match is not None:
                found.append((path, date.fromisoformat(match.group(1))))
        return found

    def _make_directory(self) -> None:
        if not self.directory.is_dir():
            make_dirs_durably(self.directory)
        os.chmod(self.directory, DIR_MODE)

    def _raise_floor(self, floor: date) -> None:
        """Record ``floor`` unless a later one is recorded (atomically and durably). Two
        rotations racing may leave the earlier of their floors, until the next one."""
        recorded = self.floor()
        if recorded is not None and recorded >= floor:
            return
        self._make_directory()
        tmp = self.directory / f".{floor.isoformat()}.{secrets.token_hex(8)}.floor"
        try:
            tmp.write_text(json.dumps({"floor": floor.isoformat()}))
            replace_durably(tmp, self.directory / FLOOR_FILE)
        except FileNotFoundError:  # a rotation to a later floor deleted our file
            tmp.unlink(missing_ok=True)

    def _read(self, day: date) -> bytes | None:
        try:
            salt = (self.directory / _salt_name(day)).read_bytes()
        except FileNotFoundError:
            return None
        if len(salt) != SALT_BYTES:
            raise SaltError(f"the salt file of {day} is damaged ({len(salt)} bytes)")
        return salt

    def _check_floor(self, day: date) -> None:
        floor = self.floor()
        if floor is not None and day < floor:
            raise SaltExpired(f"the salt of {day} was deleted (floor {floor}): the clock went back")

    def _write_temporary(self, day: date) -> tuple[Path, bytes]:
        """A new salt for ``day``, flushed to a temporary file of this process only."""
        salt = secrets.token_bytes(SALT_BYTES)
        tmp = self.directory / f".{day.isoformat()}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            view = memoryview(salt)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp, salt

    def _create(self, day: date) -> bytes:
        """Make and publish ``day``'s salt, or read the one another process published
        first. SaltExpired if a rotation moved the floor past ``day`` meanwhile: then
        either the rotation deletes what we publish, or we see its floor and do."""
        self._check_floor(day)
        self._make_directory()
        tmp, salt = self._write_temporary(day)
        path = self.directory / _salt_name(day)
        try:
            os.link(tmp, path)  # fails if the name exists, as O_EXCL would
            won = True
        except FileExistsError:
            won = False
        except FileNotFoundError:  # a rotation past the day took our temporary file
            self._check_floor(day)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(self.directory)
        if not won:
            theirs = self._read(day)
            if theirs is None:  # published, then rotated away at once
                raise SaltExpired(f"the salt of {day} was deleted as it was made")
            return theirs
        try:
            self._check_floor(day)
        except SaltExpired:
            path.unlink(missing_ok=True)
            fsync_path(self.directory)
            raise
        return salt


class ImportSalts:
    """The salts of one log import: each line is hashed with the salt of its own UTC
    day while the store still has it, and otherwise (old logs) with a per-import salt
    of that day, derived from a random key that lives in this object only and is never
    written anywhere.

    So ids of old days link a visitor within one import and one day, never across
    imports (the same visitor in two files imported separately counts twice) and never
    to the live ids. A store salt, once used, is kept for the rest of the import, so an
    import running past midnight keeps one id per visitor and day. ``store`` None: every
    day gets a per-import salt.
    """

    def __init__(self, store: SaltStore | None, key: bytes | None = None) -> None:
        self._store = store
        self._key = secrets.token_bytes(SALT_BYTES) if key is None else key
        if len(self._key) < SALT_BYTES // 2:
            raise ValueError("an import key is at least 16 bytes")
        self._kept: dict[date, bytes] = {}  # at most the days the window passes over

    def salt_for(self, day: date) -> bytes:
        kept = self._kept.get(day)
        if kept is not None:
            return kept
        if self._store is not None:
            try:
                salt = self._store.salt_for(day)
            except SaltExpired:
                pass
            else:
                self._kept[day] = salt
                return salt
        return self.import_salt(day)

    def import_salt(self, day: date) -> bytes:
        """This import's own salt of ``day``: derived, not stored, so not kept either."""
        return hashlib.blake2b(
            day.isoformat().encode("ascii"),
            key=self._key,
            digest_size=SALT_BYTES,
            person=_IMPORT_PERSON,
        ).digest()
