"""Unique-visitor sets kept per bucket and merged at query time.

A range's ``visitors`` is the number of distinct visitor hashes over all its buckets
(minutes, hours, days), so per-bucket counts cannot be added: the sets themselves are
unioned. A :class:`VisitorSet` is exact (a sorted array of unique uint64 hashes) while it
holds at most :data:`EXACT_MAX` visitors, which makes every range under 100 visitors
exact, and an Apache DataSketches CPC sketch above that: of the mergeable sketches
compared by ``scripts/bench_visitors.py`` it keeps the relative error within 2% (99th
percentile) in the fewest bytes.

Pure: numpy and datasketches in, bytes out; no Ray, no I/O.

The serialized form is a 12-byte header (magic ``FV``, format version, kind, payload
length, CRC32 of header and payload) and the payload: the exact hashes as little-endian
uint64, or the CPC sketch's own serialization. A blob that is short, altered or of an
unknown version raises :class:`VisitorSetError`.
"""

from __future__ import annotations

import collections
import struct
import zlib
from collections.abc import Iterable

import datasketches
import numpy as np

__all__ = [
    "EXACT_MAX",
    "FORMAT_VERSION",
    "LG_K",
    "VisitorSet",
    "VisitorSetError",
    "build_per_group",
]

# Sets up to this many visitors stay exact; a range under 100 visitors is made only of
# buckets under 100, so it merges to an exact set too. Exact costs 8 bytes a visitor,
# several times the sketch's, so the limit is no higher than the requirement.
EXACT_MAX = 100
# log2 of the CPC sketch's k: the smallest whose merged estimate keeps the 99th
# percentile of relative error within 2% (scripts/bench_visitors.py).
LG_K = 14
FORMAT_VERSION = 1

_MAGIC = b"FV"
_HEADER = struct.Struct("<2sBBII")  # magic, version, kind, payload bytes, crc32
_CRC = struct.Struct("<I")
_EXACT, _SKETCH = 0, 1
# Pending exact hashes of a merge are deduplicated (and moved into the sketch once past
# EXACT_MAX) whenever this many gather, so a merge of many buckets stays bounded.
_PENDING_MAX = 1 << 20
_EMPTY = np.zeros(0, np.uint64)
_EMPTY.setflags(write=False)


class VisitorSetError(ValueError):
    """A serialized visitor set that is truncated, corrupt or of an unknown format."""


def _as_hashes(hashes: object) -> np.ndarray:
    """A 1-D uint64 view of ``hashes`` (int64 taken bit for bit, as Arrow may store it)."""
    array = np.asarray(hashes)
    if array.ndim != 1:
        raise ValueError(f"visitor hashes must be 1-D, got shape {array.shape}")
    if array.dtype == np.int64:
        return array.view(np.uint64)
    if array.dtype != np.uint64:
        if array.size == 0:
            return _EMPTY
        raise TypeError(f"visitor hashes must be uint64 or int64, got {array.dtype}")
    return array


def _sorted_unique(hashes: np.ndarray) -> np.ndarray:
    """Sorted distinct values: np.sort and a comparison, far faster than np.unique."""
    ordered = np.sort(hashes)
    if ordered.size < 2:
        return ordered
    keep = np.empty(ordered.size, bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def _new_sketch(unique: np.ndarray) -> datasketches.cpc_sketch:
    """A CPC sketch of ``unique`` (the binding updates one value per call: no batch)."""
    sketch = datasketches.cpc_sketch(LG_K)
    collections.deque(map(sketch.update, unique.view(np.int64).tolist()), maxlen=0)
    return sketch


class VisitorSet:
    """An immutable set of visitor hashes: exact while small, a CPC sketch above.

    Build with :meth:`from_hashes`, :func:`build_per_group` or :meth:`from_bytes`;
    combine with :meth:`merge` (or ``a | b``); read with :meth:`estimate`.
    """

    __slots__ = ("_exact", "_sketch")

    def __init__(self, exact: np.ndarray, sketch: datasketches.cpc_sketch | None) -> None:
        """Internal: use the constructors. ``exact`` is sorted, unique and read-only,
        and empty when ``sketch`` is given."""
        self._exact = exact
        self._sketch = sketch

    # -- construction

    @classmethod
    def empty(cls) -> VisitorSet:
        return cls(_EMPTY, None)

    @classmethod
    def from_hashes(cls, hashes: object) -> VisitorSet:
        """The set of ``hashes`` (uint64, or int64 bit for bit; repeats count once)."""
        return cls._of_unique(_sorted_unique(_as_hashes(hashes)))

    @classmethod
    def _of_unique(cls, unique: np.ndarray) -> VisitorSet:
        if unique.size <= EXACT_MAX:
            exact = unique.astype(np.uint64, copy=True)
            exact.setflags(write=False)
            return cls(exact, None)
        return cls(_EMPTY, _new_sketch(unique))

    @classmethod
    def merge(cls, sets: Iterable[VisitorSet]) -> VisitorSet:
        """The union of ``sets``: each visitor once, however many buckets hold it."""
        union = _Union()
        for item in sets:
            if item._sketch is not None:
                union.add_sketch(item._sketch)
            elif item._exact.size:
                union.add_exact(item._exact)
        return union.result()

    def __or__(self, other: VisitorSet) -> VisitorSet:
        return VisitorSet.merge((self, other))

    # -- reading

    @property
    def is_exact(self) -> bool:
        return self._sketch is None

    def exact_hashes(self) -> np.ndarray | None:
        """The sorted unique hashes (read-only) of an exact set; None for a sketch."""
        return self._exact if self._sketch is None else None

    def estimate(self) -> int:
        """The number of distinct visitors: exact, or the sketch's estimate.

        A sketch holds more than EXACT_MAX visitors by construction, so its estimate
        is never reported below EXACT_MAX + 1.
        """
        if self._sketch is None:
            return int(self._exact.size)
        return max(EXACT_MAX + 1, round(self._sketch.get_estimate()))

    def __repr__(self) -> str:
        kind = "exact" if self.is_exact else "sketch"
        return f"VisitorSet({kind}, {self.estimate()})"

    # -- bytes

    def to_bytes(self) -> bytes:
        if self._sketch is None:
            kind, payload = _EXACT, self._exact.astype("<u8", copy=False).tobytes()
        else:
            kind, payload = _SKETCH, bytes(self._sketch.serialize())
        head = _HEADER.pack(_MAGIC, FORMAT_VERSION, kind, len(payload), 0)[: -_CRC.size]
        return head + _CRC.pack(zlib.crc32(payload, zlib.crc32(head))) + payload

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> VisitorSet:
        """The set :meth:`to_bytes` wrote; VisitorSetError for anything else."""
        data = bytes(blob)
        if len(data) < _HEADER.size:
            raise VisitorSetError(
                f"visitor set truncated: {len(data)} bytes, the header alone is {_HEADER.size}"
            )
        magic, version, kind, length, crc = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise VisitorSetError(f"not a visitor set: magic {magic!r}, expected {_MAGIC!r}")
        if version != FORMAT_VERSION:
            raise VisitorSetError(
                f"visitor set format version {version} unknown (this build reads {FORMAT_VERSION})"
            )
        payload = data[_HEADER.size :]
        if len(payload) != length:
            raise VisitorSetError(
                f"visitor set truncated or padded: header says {length} payload bytes, "
                f"found {len(payload)}"
            )
        if zlib.crc32(payload, zlib.crc32(data[: _HEADER.size - _CRC.size])) != crc:
            raise VisitorSetError("visitor set corrupt: checksum mismatch")
        if kind == _EXACT:
            return cls(_exact_payload(payload), None)
        if kind == _SKETCH:
            return cls(_EMPTY, _sketch_payload(payload))
        raise VisitorSetError(f"visitor set of unknown kind {kind}")


class _Union:
    """The state of one merge: CPC union of the sketches, plus the exact hashes seen.

    A lone sketch is kept as it is (no union, so its own more precise estimator
    stays); exact hashes are unioned exactly and become a sketch only past EXACT_MAX.
    """

    def __init__(self) -> None:
        self._single: datasketches.cpc_sketch | None = None
        self._union: datasketches.cpc_union | None = None
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    def _cpc_union(self) -> datasketches.cpc_union:
        if self._union is None:
            self._union = datasketches.cpc_union(LG_K)
            if self._single is not None:
                self._union.update(self._single)
                self._single = None
        return self._union

    def add_sketch(self, sketch: datasketches.cpc_sketch) -> None:
        if self._union is None and self._single is None:
            self._single = sketch
        else:
            self._cpc_union().update(sketch)

    def add_exact(self, hashes: np.ndarray) -> None:
        self._pending.append(hashes)
        self._pending_size += hashes.size
        if self._pending_size >= _PENDING_MAX:
            unique = self._take_pending()
            if unique.size > EXACT_MAX:
                self._cpc_union().update(_new_sketch(unique))
            elif unique.size:
                self._pending, self._pending_size = [unique], unique.size

    def _take_pending(self) -> np.ndarray:
        pending, self._pending, self._pending_size = self._pending, [], 0
        return _sorted_unique(np.concatenate(pending)) if pending else _EMPTY

    def result(self) -> VisitorSet:
        unique = self._take_pending()
        if self._union is None and self._single is None:
            return VisitorSet._of_unique(unique)
        if self._union is None and not unique.size:
            return VisitorSet(_EMPTY, self._single)
        union = self._cpc_union()
        if unique.size:
            union.update(_new_sketch(unique))
        return VisitorSet(_EMPTY, union.get_result())


def _exact_payload(payload: bytes) -> np.ndarray:
    if len(payload) % 8:
        raise VisitorSetError(f"visitor set corrupt: {len(payload)} bytes of exact hashes")
    values = np.frombuffer(payload, "<u8").astype(np.uint64)
    if values.size > EXACT_MAX:
        raise VisitorSetError(
            f"visitor set corrupt: {values.size} exact hashes, more than {EXACT_MAX}"
        )
    if values.size > 1 and not bool(np.all(values[1:] > values[:-1])):
        raise VisitorSetError("visitor set corrupt: exact hashes not sorted and unique")
    values.setflags(write=False)
    return values


def _sketch_payload(payload: bytes) -> datasketches.cpc_sketch:
    try:
        sketch = datasketches.cpc_sketch.deserialize(payload)
    except Exception as exc:  # the binding raises RuntimeError or ValueError
        raise VisitorSetError(f"visitor set corrupt: bad CPC sketch ({exc})") from exc
    if sketch.lg_k != LG_K:
        raise VisitorSetError(f"visitor set has a CPC sketch of lg_k {sketch.lg_k}, not {LG_K}")
    return sketch


def build_per_group(keys: object, hashes: object) -> tuple[np.ndarray, list[VisitorSet]]:
    """One set per distinct key, from parallel arrays of (group key, visitor hash).

    Returns the distinct keys (sorted) and their sets, in the same order. Keys are any
    1-D array numpy can sort (e.g. site * 2**32 + minute). Sorting, grouping and
    deduplication are vectorized; Python loops once per group, not per event.
    """
    key_array = np.asarray(keys)
    hash_array = _as_hashes(hashes)
    if key_array.ndim != 1 or key_array.shape != hash_array.shape:
        raise ValueError(
            f"keys and hashes must be 1-D and of one length, got {key_array.shape} "
            f"and {hash_array.shape}"
        )
    if key_array.size == 0:
        return key_array[:0], []
    # By hash, then stably by key: each group's hashes come out sorted, repeats adjacent
    # (two argsorts are faster than np.lexsort after np.unique's inverse).
    by_hash = np.argsort(hash_array)
    order = by_hash[np.argsort(key_array[by_hash], kind="stable")]
    key_array, hash_array = key_array[order], hash_array[order]
    first = np.empty(key_array.size, bool)
    first[0] = True
    np.not_equal(key_array[1:], key_array[:-1], out=first[1:])
    keep = first.copy()
    keep[1:] |= hash_array[1:] != hash_array[:-1]
    starts = np.flatnonzero(first[keep])
    distinct, hash_array = key_array[keep][starts], hash_array[keep]
    bounds = [*starts.tolist(), int(hash_array.size)]
    sets = [
        VisitorSet._of_unique(hash_array[start:end])
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return distinct, sets
