"""Rows/s of the breakdown dimensions (flowray.ingest.dimensions) over batches of events.

Each batch has --rows events drawn (skewed, as real traffic is) from --uas distinct
User-Agents and --urls distinct URLs and referrers, as a map task sees them. "cold"
forgets every remembered description first, as a fresh worker starts (the parser's
rules are compiled once beforehand, timed on their own); "warm" runs the same batch
again with the caches filled, as a worker does batch after batch.

    .venv/bin/python scripts/bench_dimensions.py
    .venv/bin/python scripts/bench_dimensions.py --rows 100000 --uas 300 --urls 3000 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import pyarrow as pa
import ua_parser

from flowray.ingest import dimensions

# Real User-Agents; distinct ones are made by varying their version numbers.
TEMPLATES = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{a}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:{a}.0) Gecko/20100101 Firefox/{a}.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{a}.0.0.0 Safari/537.36 Edg/{a}.0.{b}.{c}",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/{d}.{e} Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{a}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android {e}; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{a}.0.{b}.{c} Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android {e}; SM-S90{e}B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/{d}.0 Chrome/{a}.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS {d}_{e} like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/{d}.{e} Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS {d}_{e} like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/{d}.{e} Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/{a}.0.{b}.{c} Mobile Safari/537.36 "
    "(compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/{e}.{d}.{c}",
]
REFERRER_HOSTS = [
    "www.google.com",
    "news.ycombinator.com",
    "t.co",
    "www.bing.com",
    "l.facebook.com",
]


def user_agents(count: int, rng: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < count:
        values = {
            "a": rng.randint(90, 130),
            "b": rng.randint(1000, 6999),
            "c": rng.randint(1, 250),
            "d": rng.randint(12, 18),
            "e": rng.randint(1, 9),
        }
        out.add(rng.choice(TEMPLATES).format(**values))
    return sorted(out)


def urls_and_referrers(count: int, rng: random.Random) -> tuple[list[str], list[str]]:
    urls = [
        f"https://shop.example.com/p/{i}"
        + (f"?utm_source=news{i % 7}&utm_medium=email&utm_campaign=c{i % 13}" if i % 5 == 0 else "")
        for i in range(count)
    ]
    referrers = [
        f"https://{rng.choice(REFERRER_HOSTS)}/search?q=item+{i}"
        if i % 3
        else f"https://shop.example.com/p/{i}"
        for i in range(count)
    ]
    return urls, referrers


def skewed(values: list[str], rows: int, rng: random.Random) -> pa.Array:
    """rows picks from values, the first ones far more often (Zipf-like), all present."""
    weights = [1 / (rank + 1) for rank in range(len(values))]
    picked = values + rng.choices(values, weights=weights, k=rows - len(values))
    rng.shuffle(picked)
    return pa.array(picked, pa.string())


def timed(run: Callable[[], object], cold: bool, repeat: int) -> float:
    """The median seconds of one run, with the caches cleared first when cold."""
    seconds = []
    for _ in range(repeat):
        if cold:
            dimensions.clear_caches()
        else:
            run()
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--uas", type=int, default=300)
    parser.add_argument("--urls", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    uas = skewed(user_agents(args.uas, rng), args.rows, rng)
    distinct_urls, distinct_referrers = urls_and_referrers(args.urls, rng)
    urls = skewed(distinct_urls, args.rows, rng)
    referrers = skewed(distinct_referrers, args.rows, rng)
    sites = pa.array(["shop.example.com"] * args.rows, pa.string())

    start = time.perf_counter()
    dimensions.describe_user_agent(TEMPLATES[0])
    build_s = time.perf_counter() - start

    cases: list[tuple[str, Callable[[], object]]] = [
        ("parse_user_agents", lambda: dimensions.parse_user_agents(uas)),
        ("sources, one site", lambda: dimensions.sources(referrers, urls, "shop.example.com")),
        ("sources, site per row", lambda: dimensions.sources(referrers, urls, sites)),
    ]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
        f"Python {platform.python_version()}, pyarrow {pa.__version__}, "
        f"ua-parser {'.'.join(map(str, ua_parser.VERSION))} (Rust resolver)"
    )
    print(
        f"batch: {args.rows:,} rows, {args.uas} distinct User-Agents, {args.urls:,} distinct "
        f"URLs and referrers; median of {args.repeat}; building the parser: {build_s * 1e3:.0f} ms"
    )
    print(f"{'':24}{'cold rows/s':>14}{'cold ms':>10}{'warm rows/s':>14}{'warm ms':>10}")
    for name, run in cases:
        cold, warm = timed(run, True, args.repeat), timed(run, False, args.repeat)
        print(
            f"{name:24}{args.rows / cold:>14,.0f}{cold * 1e3:>10.1f}"
            f"{args.rows / warm:>14,.0f}{warm * 1e3:>10.1f}"
        )


if __name__ == "__main__":
    main()
