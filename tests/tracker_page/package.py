"""The vendored official tracker, @plausible-analytics/tracker, checked against its pin.

vendor/ holds the npm tarball as the registry serves it and tracker.lock.json, which
pins its version and npm's integrity hash (SHA-512). Every file the tests serve is read
out of the tarball only after its hash has matched, so the browser runs exactly what
npm published. scripts/tracker-assets --update vendors another version.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

VENDOR = Path(__file__).resolve().parent / "vendor"
LOCK = VENDOR / "tracker.lock.json"
PACKAGE = "@plausible-analytics/tracker"
MEMBER_BYTES_MAX = 1024 * 1024


class PackageError(Exception):
    """The vendored tarball is missing, or is not the one the lock pins."""


@dataclass(frozen=True)
class Tracker:
    version: str
    integrity: str
    files: dict[str, bytes]  # the package's files by their path in it ("plausible.js")

    @property
    def script(self) -> bytes:
        return self.files["plausible.js"]


def integrity(data: bytes) -> str:
    """npm's integrity string of a tarball: ``sha512-`` and the base64 digest."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def load() -> Tracker:
    """The pinned tracker, its tarball checked against the lock's integrity."""
    lock = json.loads(LOCK.read_text())
    if lock.get("package") != PACKAGE:
        raise PackageError(f"{LOCK} pins {lock.get('package')!r}, not {PACKAGE}")
    tarball = VENDOR / lock["tarball"]
    if not tarball.exists():
        raise PackageError(f"{tarball} is missing: run scripts/tracker-assets --update")
    data = tarball.read_bytes()
    if integrity(data) != lock["integrity"]:
        raise PackageError(
            f"{tarball.name} hashes to {integrity(data)}, the lock pins {lock['integrity']}"
        )
    return Tracker(lock["version"], lock["integrity"], _files(data))


def _files(data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            if not member.isfile() or member.size > MEMBER_BYTES_MAX:
                continue
            extracted = archive.extractfile(member)
            if extracted is not None:
                files[member.name.removeprefix("package/")] = extracted.read()
    return files
