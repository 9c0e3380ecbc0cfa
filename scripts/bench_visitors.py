"""Measures the candidates for unique-visitor sets (issue 21): which sketch to keep.

Every candidate turns uint64 visitor hashes into a serialized bucket; a query reads
buckets back, merges them and asks for an estimate. This script measures, per
candidate: the relative error of that estimate (p50, p99 and max of |error| over many
trials per cardinality), the bytes of one serialized bucket, the build time per million
hashes (one bucket, and grouped into minute buckets), the merge time of 1,440 and 10,080
serialized buckets (a day and a week of minutes), and the error of a day's union of
1,440 minute buckets in which every visitor appears in several minutes.

An accuracy trial streams one random hash sequence, dealt alternately into two buckets,
and reads every candidate at each cardinality on the way: serialize both buckets,
deserialize, merge, estimate. That is the estimate any range over more than one bucket
gets (DataSketches' HLL and CPC switch to a less precise estimator once merged), and
the larger cardinalities of a trial extend its smaller ones. Trials run on two
processes; the timings run alone, after them.

    .venv/bin/python scripts/bench_visitors.py              # 3 to 4 minutes on 2 cores
    .venv/bin/python scripts/bench_visitors.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import datasketches as ds  # noqa: E402

from flowray.query import visitors  # noqa: E402

CARDINALITIES = (
    1,
    10,
    99,
    100,
    300,
    1_000,
    3_000,
    10_000,
    30_000,
    100_000,
    300_000,
    1_000_000,
    3_000_000,
    10_000_000,
)
CHUNK = 1_000_000
TARGET = 0.02
U64 = np.uint64


# ---------------------------------------------------------------- the candidates


@dataclass(frozen=True)
class Candidate:
    """One way to keep a bucket: how to build, serialize and merge it."""

    name: str
    new: Callable[[], object]
    add: Callable[[object, np.ndarray, list[int]], object]
    dump: Callable[[object], bytes]
    merge: Callable[[Sequence[bytes]], float]
    needs_list: bool = True
    max_n: int = CARDINALITIES[-1]  # its error is measured up to this cardinality

    def build(self, hashes: np.ndarray) -> bytes:
        values = hashes.view(np.int64).tolist() if self.needs_list else []
        return self.dump(self.add(self.new(), hashes, values))

    def build_groups(self, keys: np.ndarray, hashes: np.ndarray) -> list[bytes]:
        """One bucket per distinct key (a Python loop per group, not per event)."""
        return [self.build(part) for part in split_groups(keys, hashes)]


def split_groups(keys: np.ndarray, hashes: np.ndarray) -> list[np.ndarray]:
    """The hashes of each distinct key, keys in order."""
    order = np.argsort(keys, kind="stable")
    keys, hashes = keys[order], hashes[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.split(hashes, starts[1:])


def _feed(sketch: object, values: list[int]) -> object:
    collections.deque(map(sketch.update, values), maxlen=0)  # type: ignore[attr-defined]
    return sketch


def hll_candidate(lg_k: int, kind: ds.tgt_hll_type, label: str) -> Candidate:
    def merge(blobs: Sequence[bytes]) -> float:
        union = ds.hll_union(lg_k)
        for blob in blobs:
            union.update(ds.hll_sketch.deserialize(blob))
        return float(union.get_estimate())

    return Candidate(
        f"DataSketches HLL_{label} lg_k={lg_k}",
        lambda: ds.hll_sketch(lg_k, kind),
        lambda s, _h, v: _feed(s, v),
        lambda s: bytes(s.serialize_compact()),  # type: ignore[attr-defined]
        merge,
    )


def cpc_candidate(lg_k: int) -> Candidate:
    def merge(blobs: Sequence[bytes]) -> float:
        union = ds.cpc_union(lg_k)
        for blob in blobs:
            union.update(ds.cpc_sketch.deserialize(blob))
        return float(union.get_result().get_estimate())

    return Candidate(
        f"DataSketches CPC lg_k={lg_k}",
        lambda: ds.cpc_sketch(lg_k),
        lambda s, _h, v: _feed(s, v),
        lambda s: bytes(s.serialize()),  # type: ignore[attr-defined]
        merge,
    )


def theta_candidate(lg_k: int) -> Candidate:
    def merge(blobs: Sequence[bytes]) -> float:
        union = ds.theta_union(lg_k)
        for blob in blobs:
            union.update(ds.compact_theta_sketch.deserialize(blob))
        return float(union.get_result().get_estimate())

    return Candidate(
        f"DataSketches Theta lg_k={lg_k}",
        lambda: ds.update_theta_sketch(lg_k),
        lambda s, _h, v: _feed(s, v),
        lambda s: bytes(s.compact().serialize()),  # type: ignore[attr-defined]
        merge,
    )


# A HyperLogLog of our own in numpy: 64-bit hashes, 2^p one-byte registers, Ertl's
# improved estimator (no bias tables), registers zlib-compressed when serialized.


def _rank_registers(hashes: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    q = 64 - p
    index = (hashes >> U64(q)).astype(np.intp)
    rest = hashes << U64(p)
    high = np.frexp((rest >> U64(32)).astype(np.float64))[1]
    low = np.frexp((rest & U64(0xFFFFFFFF)).astype(np.float64))[1]
    bits = np.where(high > 0, 32 + high, low)
    rank = np.minimum(64 - bits + 1, q + 1).astype(np.uint8)
    return index, rank


def _hll_add(registers: object, hashes: np.ndarray, p: int) -> object:
    index, rank = _rank_registers(hashes, p)
    np.maximum.at(registers, index, rank)  # type: ignore[call-overload]
    return registers


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        before, z = z, z + x * y
        y += y
        if z == before:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        y *= 0.5
        before, z = z, z - (1.0 - x) ** 2 * y
        if z == before:
            return z / 3.0


def _hll_estimate(registers: np.ndarray, p: int) -> float:
    q, m = 64 - p, 1 << p
    counts = np.bincount(registers, minlength=q + 2)
    z = m * _tau(1.0 - counts[q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + counts[k])
    z += m * _sigma(counts[0] / m)
    return m * m / (2.0 * math.log(2.0)) / z


def numpy_hll_candidate(p: int) -> Candidate:
    def merge(blobs: Sequence[bytes]) -> float:
        acc = np.zeros(1 << p, np.uint8)
        for blob in blobs:
            np.maximum(acc, np.frombuffer(zlib.decompress(blob), np.uint8), out=acc)
        return _hll_estimate(acc, p)

    return Candidate(
        f"numpy HLL (Ertl) p={p}",
        lambda: np.zeros(1 << p, np.uint8),
        lambda s, h, _v: _hll_add(s, h, p),
        lambda s: zlib.compress(s.tobytes()),  # type: ignore[attr-defined]
        merge,
        needs_list=False,
    )


def exact_candidate() -> Candidate:
    def add(state: object, hashes: np.ndarray, _v: list[int]) -> object:
        parts: list[np.ndarray] = state  # type: ignore[assignment]
        parts.append(hashes)
        return parts

    def merge(blobs: Sequence[bytes]) -> float:
        arrays = [np.frombuffer(b, "<u8") for b in blobs]
        return float(_unique(np.concatenate(arrays)).size) if arrays else 0.0

    return Candidate(
        "exact set (sorted unique uint64)",
        list,
        add,
        lambda s: _unique(np.concatenate(s)).astype("<u8").tobytes(),  # type: ignore[call-overload]
        merge,
        needs_list=False,
        max_n=1_000_000,
    )


def _unique(values: np.ndarray) -> np.ndarray:
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if ordered.size else ordered


def flowray_candidate() -> Candidate:
    """The module as built: exact up to its threshold, its sketch above."""

    def add(state: object, hashes: np.ndarray, _v: list[int]) -> object:
        parts: list[visitors.VisitorSet] = state  # type: ignore[assignment]
        parts.append(visitors.VisitorSet.from_hashes(hashes))
        return parts

    def dump(state: object) -> bytes:
        return visitors.VisitorSet.merge(state).to_bytes()  # type: ignore[arg-type]

    def merge(blobs: Sequence[bytes]) -> float:
        return visitors.VisitorSet.merge(
            visitors.VisitorSet.from_bytes(b) for b in blobs
        ).estimate()

    return Candidate("flowray VisitorSet", list, add, dump, merge, needs_list=False)


def candidates() -> list[Candidate]:
    return [
        exact_candidate(),
        hll_candidate(14, ds.HLL_4, "4"),
        hll_candidate(15, ds.HLL_4, "4"),
        cpc_candidate(13),
        cpc_candidate(14),
        theta_candidate(14),
        theta_candidate(15),
        numpy_hll_candidate(14),
        numpy_hll_candidate(15),
        flowray_candidate(),
    ]


class _FlowrayBuilder:
    """flowray's own grouped builder, for the build timings."""

    @staticmethod
    def build_groups(keys: np.ndarray, hashes: np.ndarray) -> list[bytes]:
        _keys, sets = visitors.build_per_group(keys, hashes)
        return [s.to_bytes() for s in sets]


# ---------------------------------------------------------------- accuracy


def _trial(args: tuple[int, int, bool]) -> dict[str, list[tuple[int, float, int]]]:
    """One hash stream up to ``top``, dealt alternately into two buckets; at each
    cardinality every candidate serializes both, merges them and estimates (a merged
    estimate: what any range over more than one bucket gets). With ``sizes``, a third
    bucket takes the whole stream, for the bytes of one bucket of n visitors."""
    seed, top, sizes = args
    rng = np.random.default_rng([21, seed])
    cands = candidates()
    ways = 3 if sizes else 2
    states = {c.name: [c.new() for _ in range(ways)] for c in cands}
    out: dict[str, list[tuple[int, float, int]]] = {c.name: [] for c in cands}
    seen = 0
    for n in (c for c in CARDINALITIES if c <= top):
        while seen < n:
            step = min(n - seen, CHUNK)
            hashes = rng.integers(0, 2**64, size=step, dtype=U64)
            values = hashes.view(np.int64).tolist()
            for c in (c for c in cands if c.max_n >= n):
                st = states[c.name]
                st[0] = c.add(st[0], hashes[0::2], values[0::2])
                st[1] = c.add(st[1], hashes[1::2], values[1::2])
                if sizes:
                    st[2] = c.add(st[2], hashes, values)
            seen += step
        for c in (c for c in cands if c.max_n >= n):
            st = states[c.name]
            estimate = c.merge([c.dump(st[0]), c.dump(st[1])])
            size = len(c.dump(st[2])) if sizes else -1
            out[c.name].append((n, estimate / n - 1.0, size))
    return out


def accuracy(trials: dict[int, int], workers: int) -> dict[str, dict[int, list[float]]]:
    """trials: the number of trials that reach each top cardinality."""
    jobs: list[tuple[int, int, bool]] = []
    for top, count in sorted(trials.items()):
        jobs += [(len(jobs) + i, top, False) for i in range(count)]
    jobs.sort(key=lambda job: -job[1])
    jobs[0] = (jobs[0][0], jobs[0][1], True)
    errors: dict[str, dict[int, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    sizes: dict[str, dict[int, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    with ProcessPoolExecutor(workers) as pool:
        for result in pool.map(_trial, jobs):
            for name, rows in result.items():
                for n, err, size in rows:
                    errors[name][n].append(err)
                    if size >= 0:
                        sizes[name][n].append(size)
    return {"errors": errors, "sizes": sizes}  # type: ignore[dict-item]


def _day_events(seed: int, distinct: int) -> tuple[np.ndarray, np.ndarray]:
    """A day of minute buckets: each visitor is seen in 1 + Poisson(3) random minutes."""
    rng = np.random.default_rng([2121, seed])
    ids = rng.integers(0, 2**64, size=distinct, dtype=U64)
    times = 1 + rng.poisson(3.0, size=distinct)
    hashes = np.repeat(ids, times)
    minutes = rng.integers(0, 1440, size=hashes.size)
    repeat = rng.random(hashes.size) < 0.3  # some visitors hit the same minute twice
    return np.r_[minutes, minutes[repeat]], np.r_[hashes, hashes[repeat]]


def _day_trial(args: tuple[int, int]) -> dict[str, float]:
    seed, distinct = args
    minutes, hashes = _day_events(seed, distinct)
    parts = split_groups(minutes, hashes)
    out = {}
    for c in candidates():
        blobs = (
            _FlowrayBuilder.build_groups(minutes, hashes)
            if c.name == "flowray VisitorSet"
            else [c.build(part) for part in parts]
        )
        out[c.name] = c.merge(blobs) / distinct - 1.0
    return out


def day_unions(trials: dict[int, int], workers: int) -> dict[str, dict[int, list[float]]]:
    jobs = [(1000 * distinct + i, distinct) for distinct, n in trials.items() for i in range(n)]
    jobs.sort(key=lambda job: -job[1])
    errors: dict[str, dict[int, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    with ProcessPoolExecutor(workers) as pool:
        for (_seed, distinct), result in zip(jobs, pool.map(_day_trial, jobs), strict=True):
            for name, err in result.items():
                errors[name][distinct].append(err)
    return errors


# ---------------------------------------------------------------- speed


def _best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def speeds(cands: Iterable[Candidate], quick: bool) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(7)
    million = rng.integers(0, 2**64, size=1_000_000, dtype=U64)
    pool_ids = rng.integers(0, 2**64, size=300_000, dtype=U64)
    grouped_hashes = pool_ids[rng.integers(0, pool_ids.size, size=1_000_000)]
    grouped_keys = rng.integers(0, 60, size=1_000_000)
    out: dict[str, dict[str, float]] = {}
    for c in cands:
        row: dict[str, float] = {}
        row["build"] = _best(lambda c=c: c.build(million))
        builder = _FlowrayBuilder if c.name == "flowray VisitorSet" else c
        row["grouped"] = _best(lambda b=builder: b.build_groups(grouped_keys, grouped_hashes))
        bucket_n = 1_000 if c.name.startswith("exact") else 50_000
        blobs = [c.build(rng.integers(0, 2**64, size=bucket_n, dtype=U64)) for _ in range(32)]
        row["bucket_n"] = bucket_n
        for buckets in (1440, 10_080):
            if quick and buckets > 1440:
                continue
            chosen = [blobs[i % len(blobs)] for i in range(buckets)]
            row[f"merge{buckets}"] = _best(lambda ch=chosen, c=c: c.merge(ch), 2)
        out[c.name] = row
    return out


# ---------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _summary(errs: list[float]) -> tuple[float, float, float]:
    a = np.abs(np.asarray(errs))
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"datasketches {metadata.version('datasketches')}"
    )


def report(acc: dict, days: dict, speed: dict, trials: dict[int, int]) -> None:
    names = list(acc["errors"])
    print(
        "\n### Relative error of the merged estimate of two buckets: "
        "p50 / p99 / max of |error|, % (bold: p99 over 2%)\n"
    )
    print("| n | trials | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for n in CARDINALITIES:
        cells = []
        count = 0
        for name in names:
            errs = acc["errors"][name].get(n)
            if not errs:
                cells.append("")
                continue
            count = len(errs)
            p50, p99, mx = _summary(errs)
            mark = "**" if p99 > TARGET else ""
            cells.append(f"{_pct(p50)} / {mark}{_pct(p99)}{mark} / {_pct(mx)}")
        print(f"| {n:,} | {count} | " + " | ".join(cells) + " |")

    print("\n### Bytes of one serialized bucket of n visitors (exact over 1M: 8 n)\n")
    print("| n | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for n in CARDINALITIES:
        cells = [
            f"{statistics.median(acc['sizes'][name][n]):,.0f}"
            if acc["sizes"][name].get(n)
            else (f"{8 * n:,}" if name.startswith("exact") else "")
            for name in names
        ]
        print(f"| {n:,} | " + " | ".join(cells) + " |")

    print(
        "\n### A day of 1,440 minute buckets, every visitor in 1 + Poisson(3) minutes, "
        "merged: p50 / p99 / max of |error|, %\n"
    )
    print("| distinct visitors | trials | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for distinct in sorted(next(iter(days.values()))):
        cells = [
            "{} / {} / {}".format(*map(_pct, _summary(days[name][distinct]))) for name in names
        ]
        count = len(days[names[0]][distinct])
        print(f"| {distinct:,} | {count} | " + " | ".join(cells) + " |")

    print("\n### Summary\n")
    print(
        "| candidate | worst p99 (at n) | meets 2% | bytes at 1M | build ms per 1M hashes "
        "(one bucket / 60 groups) | merge 1,440 ms | merge 10,080 ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        worst = max(((_summary(e)[1], n) for n, e in acc["errors"][name].items()), default=(0.0, 0))
        day_worst = max((_summary(e)[1] for e in days[name].values()), default=0.0)
        ok = "yes" if max(worst[0], day_worst) <= TARGET else "no"
        sizes = acc["sizes"][name].get(1_000_000)
        size = f"{statistics.median(sizes):,.0f}" if sizes else ""
        s = speed[name]
        merge = [f"{1e3 * s[k]:,.1f}" if k in s else "" for k in ("merge1440", "merge10080")]
        note = f" ({int(s['bucket_n']):,}/bucket)" if s["bucket_n"] != 50_000 else ""
        print(
            f"| {name} | {_pct(worst[0])} ({worst[1]:,}) | {ok} | {size} | "
            f"{1e3 * s['build']:,.0f} / {1e3 * s['grouped']:,.0f} | "
            f"{merge[0]}{note} | {merge[1]}{note} |"
        )
    runs = ", ".join(f"{count} at {n:,}" for n, count in trials.items())
    print(
        f"\nTrials per cardinality: {runs}. Bytes: one stream. Merge timings: buckets of "
        "50,000 visitors each (the exact set: 1,000), from the serialized bytes to the "
        "estimate; build timings include the conversion to Python ints that the "
        "DataSketches binding needs."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few trials: a smoke run")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    if args.quick:
        trials = {100_000: 8, 1_000_000: 2}
        day_trials = {50: 4, 10_000: 4, 300_000: 2}
    else:
        trials = {100_000: 100, 1_000_000: 80, 10_000_000: 20}
        day_trials = {50: 200, 10_000: 50, 1_000_000: 10}
    start = time.perf_counter()
    print(f"Machine: {machine()}")
    acc = accuracy(trials, args.workers)
    print(f"accuracy: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    days = day_unions(day_trials, args.workers)
    print(f"day unions: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    speed = speeds(candidates(), args.quick)
    counts = {n: sum(count for top, count in trials.items() if top >= n) for n in CARDINALITIES}
    report(acc, days, speed, {n: c for n, c in counts.items() if c})
    print(f"\nTotal time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
