"""Visitor ids that never carry an IP address: a keyed hash of (daily salt, site, IP, UA).

flowray stores no raw IP address. A page view's visitor is BLAKE2b keyed with a secret
salt of the event's UTC day over the site, the client's address and its User-Agent
(Plausible's model). The salts live in :mod:`flowray.storage.salts`, rotate daily and
are deleted, so an id links one visitor's views of one site within one day and nothing
more: not across days (another salt), not across sites (the site is hashed in), and not
back to the address once the day's salt is gone.

The id is 64 bits written as 16 lower-case hex digits:

- 64 bits because ids are only compared within one (site, day), where even a billion
  visitors expect under 0.03 colliding pairs; 128 would double what is stored and add
  no privacy, which rests on the secret 256-bit salt, not on the id's length (anyone
  holding a salt could try all 2^32 IPv4 addresses whatever the length).
- hex because it is one fixed length in one case: safe in URLs, file names and
  case-insensitive collations, and a SQL cast away from a UBIGINT
  (``('0x' || visitor)::UBIGINT`` in DuckDB); base64url would save 5 bytes an id that
  Parquet's dictionary and compression mostly save anyway.

The hashed message frames every field with its 4-byte big-endian length, so no two
different (site, ip, ua) give the same message (``('a', 'bc')`` is not ``('ab', 'c')``),
and BLAKE2b's personalization string separates these hashes from any other use of the
same key. The address is hashed in its packed form after :func:`normalize_ip`, so every
spelling of one address gives one id.

This module is pure: no clock, no files. Callers pick the salt.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from datetime import date, timedelta
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa

from flowray.core.router import normalize_site
from flowray.core.units import DAY_MS

ID_BYTES = 8  # 64 bits: see the module docstring
ID_CHARS = 2 * ID_BYTES
SALT_BYTES_MIN = 16  # shorter keys are guessable; empty would be an unkeyed (reversible) hash
SALT_BYTES_MAX = 64  # BLAKE2b's longest key
_PERSON = b"flowray-visitor1"  # BLAKE2b personalization: these ids and no other hash
_EPOCH = date(1970, 1, 1)
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped IPv6
_IP_LENGTHS = {4: (4).to_bytes(4, "big"), 16: (16).to_bytes(4, "big")}
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_inet_pton, _inet_ntop = socket.inet_pton, socket.inet_ntop

Strings: TypeAlias = pa.Array | pa.ChunkedArray | np.ndarray | Sequence[str | None]


class IpError(ValueError):
    """A client address that is not an IPv4 or IPv6 address.

    The message never repeats the text: an error is logged, and that text may be a
    real address in a near-miss form (``1.2.3.4:80``, ``[::1]``). ``positions`` are the
    bad rows of a vectorized call, ascending, so an importer can reject those lines.
    """

    def __init__(self, message: str, positions: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.positions = list(positions)


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address ``ip`` names, IPv4-mapped IPv6 as the IPv4 address it maps, without an
    IPv6 zone (``%eth0`` names an interface of the host that logged it, not the
    client). Surrounding space, ports, brackets and leading zeros in IPv4 are refused,
    not guessed at."""
    if not isinstance(ip, str):
        raise IpError("client address must be a string")
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise IpError("client address is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(address.packed)
    return address


def _packed(ip: str) -> bytes:
    """The packed form (4 or 16 bytes) of :func:`_parse_ip`'s address.

    The C parser of the system (``inet_pton``) answers first, but only for text that is
    already in its canonical form (``inet_ntop`` gives it back unchanged), which any
    parser reads as the same address; everything else goes to :mod:`ipaddress`, the
    reference, so what is accepted does not depend on the C library.
    """
    if type(ip) is str:
        family = _AF_INET6 if ":" in ip else _AF_INET
        try:
            packed = _inet_pton(family, ip)
        except (OSError, ValueError):
            pass
        else:
            if _inet_ntop(family, packed) == ip:
                return packed[12:] if packed[:12] == _MAPPED_PREFIX else packed
    return _parse_ip(ip).packed


def normalize_ip(ip: str) -> str:
    """The canonical text of an address: IPv4 dotted decimal, IPv6 compressed lower
    case, IPv4-mapped IPv6 as IPv4, no zone; :class:`IpError` if it is none."""
    return ipaddress.ip_address(_packed(ip)).compressed


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _text(value: str) -> bytes:
    # surrogatepass: any Python str hashes (a lone surrogate cannot reach Arrow anyway)
    return value.encode("utf-8", "surrogatepass")


def _keyed(salt: bytes) -> Any:
    """A BLAKE2b state keyed with ``salt``, to copy per id (the key costs a block)."""
    if not isinstance(salt, bytes | bytearray) or not (
        SALT_BYTES_MIN <= len(salt) <= SALT_BYTES_MAX
    ):
        raise ValueError(f"a salt is {SALT_BYTES_MIN} to {SALT_BYTES_MAX} bytes")
    return hashlib.blake2b(key=bytes(salt), digest_size=ID_BYTES, person=_PERSON)


def visitor_id(salt: bytes, site: str, ip: str, user_agent: str) -> str:
    """The visitor id of one page view: 16 hex digits (see the module docstring).

    ``site`` is normalized as routing does, ``ip`` by :func:`normalize_ip` (an invalid
    one raises :class:`IpError`); ``user_agent`` is hashed as it is, "" when unknown.
    """
    state = _keyed(salt)
    state.update(_frame(_text(normalize_site(site))))
    state.update(_frame(_packed(ip)))
    state.update(_frame(_text(user_agent)))
    return str(state.hexdigest())


def day_of_ms(ts_ms: int) -> date:
    """The UTC day of an event time in epoch milliseconds: the day whose salt hashes it."""
    return _EPOCH + timedelta(days=ts_ms // DAY_MS)


# --------------------------------------------------------------------------- vectorized


def _strings(values: Strings, rows: int | None, name: str) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.DictionaryArray):
        values = values.dictionary_decode()
    if not isinstance(values, pa.Array):
        values = pa.array(values, type=pa.string(), from_pandas=True)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        if not pa.types.is_null(values.type):
            raise TypeError(f"{name} must be strings, not {values.type}")
        values = values.cast(pa.string())
    if rows is not None and len(values) != rows:
        raise ValueError(f"{name} has {len(values)} rows, not {rows}")
    return values


def _encode(values: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(each row's index into the distinct values, the distinct values); a null row gets
    the index just past them."""
    encoded = values.dictionary_encode()
    codes = encoded.indices.fill_null(len(encoded.dictionary))
    return codes.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary


def _combine(*columns: tuple[np.ndarray, int]) -> np.ndarray:
    """One int64 code per row for a tuple of per-row codes (each below its bound), the
    same code for the same tuple. Re-encoding after each step keeps every code below
    the row count, so the products never overflow."""
    combined, _ = columns[0]
    for codes, bound in columns[1:]:
        mixed = pa.array(combined * bound + codes)
        combined, _ = _encode(mixed)
    return combined


def _first_rows(inverse: np.ndarray, distinct: int) -> np.ndarray:
    """For each distinct code, the first row that has it."""
    first = np.empty(distinct, dtype=np.int64)
    rows = np.arange(len(inverse) - 1, -1, -1)
    first[inverse[::-1]] = rows  # later writes win: the last written is the first row
    return first


def _ip_frames(distinct: pa.Array, ip_codes: np.ndarray) -> list[bytes | None]:
    """The framed packed form of each distinct address, None past them (null rows);
    :class:`IpError` naming every row of every invalid one."""
    frames: list[bytes | None] = []
    bad: list[int] = []
    for code, text in enumerate(distinct.to_pylist()):
        try:
            packed = _packed(text)
        except IpError:
            frames.append(None)
            bad.append(code)
        else:
            frames.append(_IP_LENGTHS[len(packed)] + packed)  # _frame, inlined
    if bad:
        positions = np.flatnonzero(np.isin(ip_codes, bad)).tolist()
        more = f" (and {len(positions) - 1} more)" if len(positions) > 1 else ""
        raise IpError(
            f"row {positions[0]}{more}: client address is not an IPv4 or IPv6 address",
            positions,
        )
    frames.append(None)
    return frames


def _hex_array(digests: list[bytes]) -> pa.Array:
    """A string array of the digests in hex, built from one hex buffer."""
    data = b"".join(digests).hex().encode("ascii")
    offsets = np.arange(len(digests) + 1, dtype=np.int32) * ID_CHARS
    return pa.StringArray.from_buffers(len(digests), pa.py_buffer(offsets), pa.py_buffer(data))


def _days(ts_ms: pa.Array | pa.ChunkedArray | np.ndarray | Sequence[int]) -> np.ndarray:
    """Each row's UTC day, as days since 1970-01-01."""
    if isinstance(ts_ms, pa.Array | pa.ChunkedArray):
        if ts_ms.null_count:
            raise ValueError("ts must not be null")
        ts_ms = ts_ms.cast(pa.int64()).to_numpy()
    return np.asarray(ts_ms, dtype=np.int64) // DAY_MS


def visitor_ids_by_day(
    salt_of_day: Callable[[date], bytes],
    ts_ms: pa.Array | pa.ChunkedArray | np.ndarray | Sequence[int],
    site: str | Strings,
    ip: Strings,
    user_agent: Strings,
) -> pa.Array:
    """:func:`visitor_id` of every row, each hashed with the salt of its own UTC day.

    For log imports: ``salt_of_day`` is asked once per distinct day (see
    :class:`flowray.storage.salts.ImportSalts`). ``site`` is one site or one per row. A
    null ``ip`` gives a null id (an unknown client has no visitor); a null user agent
    hashes as "". Every distinct (day, site, ip, ua) is hashed once, so the cost
    follows the distinct visitors, not the rows; invalid addresses raise
    :class:`IpError` listing their rows. Returns a string array.
    """
    days = _days(ts_ms)
    rows = len(days)
    ips = _strings(ip, rows, "ip")
    uas = _strings(user_agent, rows, "user_agent").fill_null("")
    sites = _strings(pa.repeat(site, rows) if isinstance(site, str) else site, rows, "site")
    if sites.null_count:
        raise ValueError("site must not be null")
    if rows == 0:
        return pa.array([], type=pa.string())
    ip_codes, ip_distinct = _encode(ips)
    ua_codes, ua_distinct = _encode(uas)
    site_codes, site_distinct = _encode(sites)
    day_codes, day_distinct = _encode(pa.array(days))
    ip_frames = _ip_frames(ip_distinct, ip_codes)
    inverse = _combine(
        (ip_codes, len(ip_distinct) + 1),
        (ua_codes, len(ua_distinct)),
        (site_codes, len(site_distinct)),
        (day_codes, len(day_distinct)),
    )
    first = _first_rows(inverse, int(inverse.max()) + 1)
    digests = _digests(
        salts=[salt_of_day(_EPOCH + timedelta(days=d)) for d in day_distinct.to_pylist()],
        site_frames=[_frame(_text(normalize_site(s))) for s in site_distinct.to_pylist()],
        ip_frames=ip_frames,
        ua_frames=[_frame(_text(ua)) for ua in ua_distinct.to_pylist()],
        tuples=zip(
            day_codes[first].tolist(),
            site_codes[first].tolist(),
            ip_codes[first].tolist(),
            ua_codes[first].tolist(),
            strict=True,
        ),
    )
    take = pa.array(inverse, mask=ips.is_null().to_numpy(zero_copy_only=False))
    return _hex_array(digests).take(take)


def _digests(
    salts: list[bytes],
    site_frames: list[bytes],
    ip_frames: list[bytes | None],
    ua_frames: list[bytes],
    tuples: Iterable[tuple[int, int, int, int]],
) -> list[bytes]:
    """The digest of each distinct (day, site, ip, ua), given as indexes into the
    lists; zeros for a null address (its rows are masked). The keyed state with the
    site already fed is made once per (day, site) and copied per id."""
    prefixes: dict[tuple[int, int], Any] = {}
    digests: list[bytes] = []
    null_digest = bytes(ID_BYTES)
    for day, site, ip, ua in tuples:
        ip_frame = ip_frames[ip]
        if ip_frame is None:
            digests.append(null_digest)
            continue
        prefix = prefixes.get((day, site))
        if prefix is None:
            prefix = prefixes[day, site] = _keyed(salts[day])
            prefix.update(site_frames[site])
        state = prefix.copy()
        state.update(ip_frame + ua_frames[ua])
        digests.append(state.digest())
    return digests


def visitor_ids(salt: bytes, site: str | Strings, ip: Strings, user_agent: Strings) -> pa.Array:
    """:func:`visitor_id` of every row with one salt (rows of one day), vectorized as
    :func:`visitor_ids_by_day` is."""
    rows = len(ip)
    _keyed(salt)  # refuse a bad salt even for no rows
    return visitor_ids_by_day(lambda _day: salt, np.zeros(rows, np.int64), site, ip, user_agent)
