"""Site routing: a normalized site name, a stable hash, shards, and shard groups.

Python's ``hash()`` is salted per process, so routing uses BLAKE2b, which gives every
process on every machine the same answer. The shard of a site never changes; the group
that owns a shard is data (:class:`ShardMap`), so a shard can be moved later.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import idna

from flowray.core.invariant import require

SITE_BYTES_MAX = 253
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")  # fullmatch: "$" would pass "a\n"


class SiteError(ValueError):
    """A site name that cannot be a web site's host name."""


SITES_CACHED_MAX = 1 << 18

# Which rule made the stored site names: a site's shard is a hash of its normalized
# name, so a data directory records the rule (see flowray.cluster.control) and names
# written under another rule need `flowray migrate-sites`. "idna2003" was Python's
# built-in codec; "uts46" is UTS #46 non-transitional (IDNA 2008), as browsers map.
SITE_RULE = "uts46"
SITE_RULE_OLD = "idna2003"


def normalize_site(raw: object) -> str:
    """Return the canonical form of a site name, or raise :class:`SiteError`.

    Sites repeat across requests, so valid names are remembered (bounded LRU).
    """
    if not isinstance(raw, str):
        raise SiteError("site must be a string")
    return _normalize_site(raw)


@functools.lru_cache(maxsize=SITES_CACHED_MAX)
def _normalize_site(raw: str) -> str:
    """The canonical form of a site name, or raise :class:`SiteError`.

    Host names are case-insensitive and may carry a trailing root dot, so both are
    folded away; internationalized names are stored in their ASCII form (UTS #46, as
    browsers name them) so the same site always hashes the same. A URL, a port or a
    path is refused rather than guessed at: the caller sends the host name.
    """
    site = raw.strip()
    folded = site.lower().rstrip(".")
    # A name that is ASCII once lower-cased keeps the rule it always had (the C
    # parser's fast path and every stored shard rely on it); only the rest is mapped.
    site = folded if folded.isascii() else _uts46_ascii(site, raw)
    if not site:
        raise SiteError("site is empty")
    if len(site) > SITE_BYTES_MAX:
        raise SiteError(f"site is longer than {SITE_BYTES_MAX} characters")
    labels = site.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise SiteError(f"site {raw!r} is not a valid host name")
    return site


def _uts46_ascii(site: str, raw: str) -> str:
    """The ASCII form of a non-ASCII name by UTS #46 non-transitional processing.

    The mapping folds case and width and turns every dot-like separator into ".";
    labels still non-ASCII are then checked by IDNA 2008 (joiners in context, bidi, no
    symbols) and punycoded. Labels that are ASCII after mapping are left to the ASCII
    rule, as browsers leave them (they do not apply IDNA 2008's hyphen or A-label checks
    there), so a name and its ASCII form always normalize alike.
    """
    try:
        mapped = idna.uts46_remap(site, std3_rules=False, transitional=False)
        labels = mapped.rstrip(".").split(".")
        return ".".join(
            label if label.isascii() else idna.alabel(label).decode("ascii") for label in labels
        )
    except idna.IDNAError as exc:
        raise SiteError(f"site {raw!r} is not a valid host name: {_idna_reason(exc)}") from exc


def _idna_reason(exc: idna.IDNAError) -> str:
    """What IDNA 2008 objects to, in words a site owner can act on."""
    code = getattr(exc, "code", None)  # recent idna names the rule; older: its message
    point = getattr(exc, "codepoint", None)
    char = "" if point is None else f"U+{point:04X} {unicodedata.name(chr(point), '')}".strip()
    if code == "contextj":
        return (
            f"{char} is allowed only where IDNA 2008 permits a joiner (after a virama, or a "
            "non-joiner between joining letters)"
        )
    if code == "contexto":
        return f"{char} is allowed only in its IDNA 2008 context"
    if code in ("disallowed_codepoint", "uts46_disallowed") and point is not None:
        if unicodedata.category(chr(point)).startswith("S"):
            return f"{char} is a symbol or emoji, which IDNA 2008 does not allow in host names"
        return f"{char} is not allowed in host names (IDNA 2008)"
    if code is not None and code.startswith("bidi"):
        return "a label mixes right-to-left and left-to-right text (IDNA bidi rule)"
    if code in ("input_too_long", "domain_too_long", "label_too_long"):
        return f"too long (at most {SITE_BYTES_MAX} characters, 63 a label)"
    return str(exc)


def stable_hash64(value: str, salt: bytes = b"") -> int:
    """A 64-bit hash of ``value`` that is the same in every process and release."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, person=salt[:16])
    return int.from_bytes(digest.digest(), "little")


SHARD_SALT = b"flowray-shard"


@functools.lru_cache(maxsize=SITES_CACHED_MAX)
def shard_for_site(site: str, shard_count: int) -> int:
    """The shard (0..shard_count-1) that owns an already normalized site."""
    if shard_count < 1:
        raise ValueError("shard_count must be at least 1")
    return stable_hash64(site, SHARD_SALT) % shard_count


def reduce_key_for_shard(shard: int, key_count: int) -> int:
    """The reduce key of a shard's sites (so a site has exactly one key): a reduce task
    then owns whole (shard, hour) units and writes their files itself. Shards are
    hash-balanced, so keys are too when the shard count is a multiple of the keys."""
    return shard % key_count


@dataclass(frozen=True)
class ShardMap:
    """Which group owns each shard. ``owners[s]`` is the group id of shard ``s``."""

    owners: tuple[int, ...]

    @classmethod
    def round_robin(cls, shard_count: int, group_count: int) -> ShardMap:
        """Spread shards evenly: shard s goes to group s mod G (seed: 10 shards, 5 groups)."""
        if group_count < 1:
            raise ValueError("group_count must be at least 1")
        if shard_count < group_count:
            raise ValueError(
                f"shards ({shard_count}) must be at least groups ({group_count}): "
                "a group without a shard would sit idle"
            )
        return cls(tuple(s % group_count for s in range(shard_count)))

    @property
    def shard_count(self) -> int:
        return len(self.owners)

    @property
    def group_count(self) -> int:
        return max(self.owners) + 1

    def group_of_shard(self, shard: int) -> int:
        return self.owners[shard]

    def shards_of_group(self, group: int) -> list[int]:
        return [s for s, g in enumerate(self.owners) if g == group]

    def group_of_site(self, site: str) -> int:
        return self.owners[shard_for_site(site, self.shard_count)]

    def with_moves(self, moves: Iterable[tuple[int, int, int]]) -> ShardMap:
        """This map after (shard, from group, to group) moves, in order."""
        owners = list(self.owners)
        for shard, from_group, to_group in moves:
            require(0 <= shard < len(owners), f"no shard {shard}")
            require(owners[shard] == from_group, f"shard {shard} moved from a group not its own")
            owners[shard] = to_group
        return ShardMap(tuple(owners))

    @staticmethod
    def groups_ever(shard: int, base: ShardMap, moves: Iterable[tuple[int, int, int]]) -> list[int]:
        """Every group that has owned ``shard`` (and so may hold some of its blocks)."""
        groups = {base.owners[shard]} | {to for s, _f, to in moves if s == shard}
        return sorted(groups)

    def to_json(self) -> list[int]:
        return list(self.owners)

    @classmethod
    def from_json(cls, owners: Sequence[int]) -> ShardMap:
        return cls(tuple(int(g) for g in owners))


def shards_of_sites(sites: Iterable[str], shard_count: int) -> dict[str, int]:
    """Shard of each distinct site; callers hash the distinct values once per batch."""
    return {site: shard_for_site(site, shard_count) for site in set(sites)}
