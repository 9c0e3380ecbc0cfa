"""Scoped access tokens: a SQLite store every API process reads, and the rules.

A token is ``fr_`` plus 32 random bytes (URL-safe base64). It is shown once, when it
is created; the store keeps only its SHA-256. The tokens are random, so a fast hash is
enough (a slow password hash protects guessable secrets, and these are not guessable),
and a stolen copy of the store lets nobody in. Each token has a short public id (the
first hex digits of its hash), a scope, the sites it is limited to and an optional
rate limit.

The :class:`Authorizer` holds the rules and does no I/O of its own: it reads the store
through an injected :class:`TokenSource`, at most once per ``reload_s`` (so a revoked
token stops working within seconds without a query per request), and takes its time
from an injected clock, which also drives the per-token rate limits. The app asks it
two questions: may this ``Authorization`` header use a route of this kind now
(:meth:`Authorizer.admit`), and may this grant touch these sites (:func:`allow_sites`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flowray.config import AUTH_MODES
from flowray.core.router import SiteError, normalize_site
from flowray.storage.durable import make_dirs_durably

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "FLOWRAY_ADMIN_TOKEN"
TOKEN_PREFIX = "fr_"
TOKEN_BYTES = 32
ID_HEX = 8
SCOPES = ("ingest", "read", "admin")
# Which token scopes may use each kind of route.
ALLOWED_SCOPES = {
    "ingest": frozenset({"ingest", "admin"}),
    "read": frozenset({"read", "admin"}),
    "admin": frozenset({"admin"}),
}
RELOAD_S = 2.0
# A bucket holds this many seconds' worth of requests: short bursts pass, floods wait.
BURST_S = 2.0
SITES_PER_TOKEN_MAX = 1000
TOKENS_MAX = 10_000
NAME_CHARS_MAX = 200
FORBIDDEN_SITES_SHOWN_MAX = 20
STORE_TIMEOUT_S = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL CHECK (scope IN ('ingest', 'read', 'admin')),
    sites TEXT NOT NULL,
    rate_per_s REAL,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
)
"""


class StoreUnavailable(RuntimeError):
    """The token store cannot be read or written (locked too long, corrupt, unreadable)."""


@dataclass(frozen=True)
class TokenRecord:
    """What the store knows of a token: never the token itself."""

    id: str
    digest: str
    scope: str
    sites: frozenset[str]
    rate_per_s: float | None
    name: str
    created_ms: int
    revoked_ms: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None

    def public(self) -> dict[str, Any]:
        """The fields safe to show anyone who may list tokens (no digest)."""
        return {
            "id": self.id,
            "scope": self.scope,
            "sites": sorted(self.sites),
            "rate_per_s": self.rate_per_s,
            "name": self.name,
            "created_ms": self.created_ms,
            "revoked": self.revoked,
            "revoked_ms": self.revoked_ms,
        }


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_grant(
    scope: str, sites: Iterable[str], rate_per_s: float | None, name: str = ""
) -> tuple[str, frozenset[str], float | None]:
    """Validate what a new token may do; raise ValueError with a message for the user.

    Sites are normalized exactly as ingest and queries normalize them, so a token for
    ``Shop.Example.`` covers the same data as one for ``shop.example``.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    raw = list(sites)
    if scope == "admin" and raw:
        raise ValueError("an admin token covers every site; drop --site")
    if scope != "admin" and not raw:
        raise ValueError(f"a {scope} token must name the sites it covers (--site DOMAIN)")
    if len(raw) > SITES_PER_TOKEN_MAX:
        raise ValueError(f"a token covers at most {SITES_PER_TOKEN_MAX} sites")
    try:
        normalized = frozenset(normalize_site(s) for s in raw)
    except SiteError as exc:
        raise ValueError(str(exc)) from exc
    if rate_per_s is not None and not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate must be a positive number of requests/s, got {rate_per_s}")
    if len(name) > NAME_CHARS_MAX:
        raise ValueError(f"name is longer than {NAME_CHARS_MAX} characters")
    return scope, normalized, rate_per_s


class TokenSource(Protocol):
    def active(self) -> list[TokenRecord]:
        """Every unrevoked token; raise StoreUnavailable when that cannot be known."""


class TokenStore:
    """Tokens in ``DATA_DIR/tokens.sqlite`` (WAL: the CLI writes while APIs read).

    Every call opens its own short connection, so the store is safe from any thread
    or process, and a missing file is simply an empty store (reading never creates it).
    """

    def __init__(self, path: Path, timeout_s: float = STORE_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"token store {self.path}: {exc}") from exc
        try:
            with conn:
                yield conn
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"token store {self.path}: {exc}") from exc
        finally:
            conn.close()

    def _create_schema(self) -> None:
        make_dirs_durably(self.path.parent)
        fresh = not self.path.exists()
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
        if fresh:
            os.chmod(self.path, 0o600)

    def create(
        self,
        scope: str,
        sites: Iterable[str] = (),
        rate_per_s: float | None = None,
        name: str = "",
        now_ms: int | None = None,
    ) -> tuple[str, TokenRecord]:
        """A new token and its record; the token is returned here and never again."""
        scope, normalized, rate_per_s = check_grant(scope, sites, rate_per_s, name)
        self._create_schema()
        created_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._connect() as conn:
            (count,) = conn.execute("SELECT count(*) FROM tokens").fetchone()
            if count >= TOKENS_MAX:
                raise ValueError(f"the store holds {TOKENS_MAX} tokens; revoke and prune some")
            for _attempt in range(8):  # ids are short: on the rare clash, draw again
                token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
                digest = digest_of(token)
                record = TokenRecord(
                    digest[:ID_HEX], digest, scope, normalized, rate_per_s, name, created_ms
                )
                clash = conn.execute("SELECT 1 FROM tokens WHERE id = ?", (record.id,))
                if clash.fetchone() is None:
                    conn.execute(
                        "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                        (
                            record.id,
                            digest,
                            scope,
                            json.dumps(sorted(normalized)),
                            rate_per_s,
                            name,
                            created_ms,
                        ),
                    )
                    return token, record
        raise StoreUnavailable("could not draw a token with an unused id")

    def records(self) -> list[TokenRecord]:
        """Every token, revoked ones included, oldest first."""
        if not self.path.exists():
            return []
        with self._connect() as conn:
            try:
                rows = conn.execute(
                    "SELECT id, digest, scope, sites, rate_per_s, name, created_ms, revoked_ms "
                    "FROM tokens ORDER BY created_ms, id"
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
        return [_record(row) for row in rows]

    def active(self) -> list[TokenRecord]:
        return [r for r in self.records() if not r.revoked]

    def revoke(self, token_id: str, now_ms: int | None = None) -> TokenRecord | None:
        """Mark a token revoked (kept for the record); None when no token has that id."""
        revoked_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if not self.path.exists():
            return None
        with self._connect() as conn:
            conn.execute(
                "UPDATE tokens SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
                (revoked_ms, token_id),
            )
        return next((r for r in self.records() if r.id == token_id), None)


def _record(row: tuple[Any, ...]) -> TokenRecord:
    token_id, digest, scope, sites, rate, name, created_ms, revoked_ms = row
    return TokenRecord(
        token_id, digest, scope, frozenset(json.loads(sites)), rate, name, created_ms, revoked_ms
    )


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Grant:
    """What an authenticated request may do."""

    token_id: str
    scope: str
    sites: frozenset[str]
    rate_per_s: float | None = None

    def may_touch(self, site: str) -> bool:
        return self.scope == "admin" or site in self.sites


ENV_ADMIN = Grant(token_id="env", scope="admin", sites=frozenset())


@dataclass(frozen=True)
class Decision:
    """An answer to a request: ``status`` 200 lets it through, anything else is sent."""

    status: int
    error: str = ""
    grant: Grant | None = None
    retry_after_s: int | None = None
    forbidden_sites: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == 200

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": 'Bearer realm="flowray"'}
        if self.retry_after_s is not None:
            return {"Retry-After": str(self.retry_after_s)}
        return {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.forbidden_sites:
            out["forbidden_sites"] = list(self.forbidden_sites)
        return out


OPEN = Decision(200)


def allow_sites(grant: Grant | None, sites: Iterable[str]) -> Decision:
    """May ``grant`` touch every one of ``sites`` (normalized)? None means auth is off.

    A batch is judged whole: one forbidden site rejects it, and the answer lists them.
    """
    if grant is None or grant.scope == "admin":
        return OPEN
    forbidden = sorted({s for s in sites if s not in grant.sites})
    if not forbidden:
        return Decision(200, grant=grant)
    shown = forbidden[:FORBIDDEN_SITES_SHOWN_MAX]
    more = f" and {len(forbidden) - len(shown)} more" if len(forbidden) > len(shown) else ""
    return Decision(
        403,
        f"token {grant.token_id} may not touch site(s) {', '.join(shown)}{more}",
        grant=grant,
        forbidden_sites=tuple(shown),
    )


def bearer_token(header: str | None) -> str | None:
    """The token in an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


@dataclass
class TokenBucket:
    """A request costs one unit; units refill at ``rate_per_s`` up to ``BURST_S`` of them."""

    rate_per_s: float
    level: float
    updated_s: float

    @classmethod
    def full(cls, rate_per_s: float, now_s: float) -> TokenBucket:
        return cls(rate_per_s, cls.capacity_of(rate_per_s), now_s)

    @staticmethod
    def capacity_of(rate_per_s: float) -> float:
        return max(1.0, rate_per_s * BURST_S)

    def take(self, now_s: float) -> float:
        """Spend a unit and return 0, or return the seconds until one is available."""
        elapsed = max(0.0, now_s - self.updated_s)
        capacity = self.capacity_of(self.rate_per_s)
        self.level = min(capacity, self.level + elapsed * self.rate_per_s)
        self.updated_s = now_s
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate_per_s


@dataclass(frozen=True)
class _Snapshot:
    """The unrevoked tokens by id, as last read; ``failed`` when the last read failed."""

    by_id: dict[str, TokenRecord] = field(default_factory=dict)
    failed: bool = False


class Authorizer:
    """Decides, per request, whether a bearer token may use a kind of route.

    Modes: ``off`` lets everything through; ``on`` demands a token everywhere it
    applies; ``auto`` demands one as soon as an admin token is configured or the store
    holds an unrevoked token, so a fresh local cluster works with no setup. If the
    store cannot be read, ``auto`` fails closed: it keeps the tokens it last saw and
    enforces them.
    """

    def __init__(
        self,
        source: TokenSource,
        *,
        mode: str = "auto",
        admin_token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        reload_s: float = RELOAD_S,
    ) -> None:
        if mode not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, got {mode!r}")
        self.source = source
        self.mode = mode
        self.clock = clock
        self.reload_s = reload_s
        self._admin_digest = digest_of(admin_token) if admin_token else None
        self._snapshot = _Snapshot()
        self._loaded_s: float | None = None
        self._buckets: dict[str, TokenBucket] = {}

    def enforced(self) -> bool:
        snapshot = self._tokens()
        if self.mode != "auto":
            return self.mode == "on"
        return self._admin_digest is not None or bool(snapshot.by_id) or snapshot.failed

    def admit(self, header: str | None, need: str) -> Decision:
        """401, 403 (wrong scope), 429 or 200 with the grant (None grant: auth is off)."""
        if not self.enforced():
            return OPEN
        presented = bearer_token(header)
        if presented is None:
            return Decision(401, "this route needs a token: send 'Authorization: Bearer TOKEN'")
        grant = self._identify(presented)
        if grant is None:
            return Decision(401, "unknown or revoked token")
        if grant.scope not in ALLOWED_SCOPES[need]:
            allowed = " or ".join(sorted(ALLOWED_SCOPES[need]))
            return Decision(
                403, f"token {grant.token_id} has scope {grant.scope}; this route needs {allowed}"
            )
        wait_s = self._take(grant)
        if wait_s > 0:
            return Decision(
                429,
                f"token {grant.token_id} is limited to {grant.rate_per_s:g} requests/s",
                grant=grant,
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        return Decision(200, grant=grant)

    def _identify(self, presented: str) -> Grant | None:
        digest = digest_of(presented)
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return ENV_ADMIN
        record = self._tokens().by_id.get(digest[:ID_HEX])
        if record is None or not hmac.compare_digest(record.digest, digest):
            return None
        return Grant(record.id, record.scope, record.sites, record.rate_per_s)

    def _take(self, grant: Grant) -> float:
        if grant.rate_per_s is None:
            return 0.0
        now_s = self.clock()
        bucket = self._buckets.get(grant.token_id)
        if bucket is None:
            bucket = self._buckets[grant.token_id] = TokenBucket.full(grant.rate_per_s, now_s)
        return bucket.take(now_s)

    def _tokens(self) -> _Snapshot:
        """The cached tokens, re-read from the source at most every ``reload_s``."""
        now_s = self.clock()
        if self._loaded_s is not None and now_s - self._loaded_s < self.reload_s:
            return self._snapshot
        self._loaded_s = now_s
        try:
            records = self.source.active()
        except StoreUnavailable as exc:
            log.warning("keeping the last known tokens: %s", exc)
            self._snapshot = _Snapshot(self._snapshot.by_id, failed=True)
            return self._snapshot
        self._snapshot = _Snapshot({r.id: r for r in records if not r.revoked})
        # Buckets of tokens that are gone would only pile up.
        self._buckets = {k: b for k, b in self._buckets.items() if k in self._snapshot.by_id}
        return self._snapshot
