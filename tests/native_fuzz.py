"""Exercise flowray's C parser built elsewhere (with sanitizers): every prefix of some
bodies, then random mutations of good ones, for a few seconds. Exits non-zero (the
sanitizer aborts) at the first memory error or undefined behaviour.

    python tests/native_fuzz.py DIR_WITH_NATIVE_SO SECONDS
"""

from __future__ import annotations

import importlib.util
import random
import sys
import time
from pathlib import Path

NOW_MS = 1_795_600_000_000
ROWS = [
    b'{"ts":1795599999000,"site":"s1.com","path":"/p","ua":"Mozilla/5.0","id":"e1"}',
    b'{"site":"B.com","ts":"2026-11-25T09:00:00.123+01:00","referrer":null,"x":1.25}',
    b'{"site":"d.io","path":"\\/caf\\u00e9 \\ud83d\\ude00 \\"q\\"\\t","ua":"\\\\"}',
    b'{"site":"c.io","ts":"1795599999999","visitor":"v","id":"","y":[1,{"a":null}]}',
]
GOOD = {"ndjson": b"\n".join(ROWS) + b"\n", "json": b"[\n  " + b",\n  ".join(ROWS) + b"\n]"}
ALPHABET = (
    b'{}[]":,\\ \t\r\n-+.0123456789eEtrufalsnTZudcbDC\x00\x0b\x1f'
    b"\xc3\xa9\xef\xbb\xbf\x80\xed\xf0\xf4\xff"  # UTF-8, and bytes that begin no good sequence
)


def mutate(good: bytes, rng: random.Random, alphabet: bytes) -> bytes:
    """``good`` with 1 to 3 bytes dropped, doubled or replaced from ``alphabet``."""
    body = bytearray(good)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(body))
        op = rng.randrange(3)
        if op == 0:
            del body[at]
        elif op == 1:
            body.insert(at, body[at])
        else:
            body[at] = rng.choice(alphabet)
    return bytes(body)


def main() -> None:
    path = next(Path(sys.argv[1]).glob("_native*.so"))
    spec = importlib.util.spec_from_file_location("_native", path)
    assert spec is not None and spec.loader is not None
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    parsers = {"ndjson": native.ndjson, "json": native.json}

    def parse(form: str, body: bytes, events_max: int = 100) -> object:
        return parsers[form](body, NOW_MS, 0, NOW_MS + 300_000, 2048, 128, events_max)

    accepted = 0
    for form, good in GOOD.items():
        for cut in range(len(good) + 1):
            parse(form, bytes(good[:cut]))  # an exact-size copy: overreads show
        accepted += parse(form, good) is not None
    assert accepted == 0  # the nested value in the last row: declined whole
    rng = random.Random(int(time.time()))
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        form = rng.choice(["ndjson", "json"])
        body = mutate(GOOD[form], rng, ALPHABET)
        parse(form, body, rng.choice([1, 2, 3, 100]))
    print("ok")


if __name__ == "__main__":
    main()
