"""The vectorized fast paths agree with the exact parsers, differentially.

For any body: when a fast path answers, the exact parser must accept the body and give
the very same table; when the exact parser rejects a body, the fast path must decline.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.ingest import events as ev
from flowray.ingest import fastparse

NOW_MS = 1_795_600_000_000
LIMITS = ev.Limits(now_ms=NOW_MS, batch_events_max=50)

sites = st.sampled_from(
    [
        "a.com",
        "B.com",
        "shop.example.",
        "bad site",
        "",
        "x" * 300,
        "xn--bcher-kva.example",
        "ok-1.io",
    ]
)
stamps = st.one_of(
    st.integers(min_value=946_684_800_000 - 5, max_value=NOW_MS + 400_000),
    st.sampled_from(
        [
            0,
            1.0,
            1_700_000_000_000.0,
            1_700_000_000_000.5,
            True,
            None,
            "2020-03-14T07:20:39.595Z",
            "2020-03-14T07:20:39",
            2**70,
        ]
    ),
)
strings = st.one_of(st.none(), st.text(max_size=5), st.sampled_from(["", "a" * 3000, 7]))


@st.composite
def event(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()) or True:
        out["site"] = draw(sites)
    if draw(st.integers(0, 9)) > 0:
        out["ts"] = draw(stamps)
    for name in ("path", "id", "ua"):
        if draw(st.booleans()):
            out[name] = draw(strings)
    return out


def _exact(
    parse: Callable[[bytes, ev.Limits], pa.Table], body: bytes, monkeypatch: pytest.MonkeyPatch
) -> pa.Table | None:
    with monkeypatch.context() as m:
        for name in ("ndjson", "seed", "json_array"):
            m.setattr(fastparse, name, lambda *_a, **_k: None)
        m.setattr(fastparse, "_native", None)
        try:
            return parse(body, LIMITS)
        except ev.BatchRejected:
            return None


def _agree(fast: pa.Table | None, exact: pa.Table | None) -> None:
    if fast is None:
        return
    assert exact is not None, "the fast path accepted a batch the exact parser rejects"
    assert fast.equals(exact), (fast.to_pylist()[:3], exact.to_pylist()[:3])


@settings(max_examples=300, deadline=None)
@given(st.lists(event(), min_size=0, max_size=8))
def test_ndjson_fast_path_agrees(events: list[dict[str, Any]]) -> None:
    body = b"\n".join(
        orjson.dumps(e, option=orjson.OPT_PASSTHROUGH_DATACLASS) for e in events if _dumpable(e)
    )
    mp = pytest.MonkeyPatch()
    _agree(fastparse.ndjson(body, LIMITS), _exact(ev.parse_ndjson_body, body, mp))


@settings(max_examples=300, deadline=None)
@given(st.lists(event(), min_size=0, max_size=8))
def test_ndjson_arrow_path_agrees_without_the_c_parser(events: list[dict[str, Any]]) -> None:
    body = b"\n".join(orjson.dumps(e) for e in events if _dumpable(e))
    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(fastparse, "_native", None)
        fast = fastparse.ndjson(body, LIMITS)
    _agree(fast, _exact(ev.parse_ndjson_body, body, mp))


@settings(max_examples=300, deadline=None)
@given(st.lists(event(), min_size=0, max_size=8))
def test_json_array_fast_path_agrees(events: list[dict[str, Any]]) -> None:
    items = [e for e in events if _dumpable(e)]
    body = orjson.dumps(items)
    mp = pytest.MonkeyPatch()
    _agree(fastparse.json_array(orjson.loads(body), LIMITS), _exact(ev.parse_json_body, body, mp))


# Any digits in the right places, real dates or not (leap days, month 13, hour 24...).
any_date = st.builds(
    "{:04d}.{:02d}.{:02d}".format,
    st.sampled_from([1969, 1999, 2000, 2023, 2024, 2100, 2400]) | st.integers(1970, 2099),
    st.integers(0, 13),
    st.integers(0, 32),
)
any_time = st.builds(
    "{:02d}:{:02d}:{:02d}.{:03d}".format,
    st.integers(0, 25),
    st.integers(0, 61),
    st.integers(0, 61),
    st.integers(0, 999),
)
seed_lines = st.lists(
    st.tuples(
        st.sampled_from(["2020.03.14", "2020.02.30", "2020.3.14", "1999.12.31", "2100.01.01"])
        | st.sampled_from(["2024.02.29", "2023.02.29", "2000.02.29", "2020.0３.14", "2020-03-14"])
        | any_date,
        st.sampled_from(["07:20:39.595", "07:20:39", "25:00:00.000", "07:20:39.5", "23:59:59.999"])
        | st.sampled_from(["07:20:3９.595", "07.20.39.595", "0７:20:39.595"])
        | any_time,
        sites,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=1000, deadline=None)
@given(seed_lines)
def test_seed_fast_path_agrees(lines: list[tuple[str, str, str]]) -> None:
    body = "\n".join(f"{d} {t} {s}" for d, t, s in lines).encode()
    mp = pytest.MonkeyPatch()
    _agree(fastparse.seed(body, LIMITS), _exact(ev.parse_seed_body, body, mp))


separators = st.sampled_from(["\n", "\n\n", "\r\n", " \n", "\n \n", "\t", "  ", " ", "\x0b"])


@settings(max_examples=500, deadline=None)
@given(
    seed_lines,
    st.lists(separators, min_size=6, max_size=6),
    st.sampled_from(["", "\n", "\n\n", " ", "\ufeff"]),
    st.sampled_from(["", "\n", "\n\n", " ", "\n "]),
)
def test_seed_fast_path_agrees_whatever_surrounds_the_lines(
    lines: list[tuple[str, str, str]], seps: list[str], lead: str, tail: str
) -> None:
    texts = [f"{d} {t} {s}" for d, t, s in lines]
    body = (lead + "".join(x + sep for x, sep in zip(texts, seps, strict=False)) + tail).encode()
    mp = pytest.MonkeyPatch()
    _agree(fastparse.seed(body, LIMITS), _exact(ev.parse_seed_body, body, mp))


def test_seed_fast_path_skips_empty_lines_and_takes_a_missing_final_newline() -> None:
    one, two = b"2020.03.14 07:20:39.595 taobao.com", b"2020.03.14 07:25:42.412 Tmall.com."
    mp = pytest.MonkeyPatch()
    for body in [one + b"\n" + two, b"\n" + one + b"\n\n\n" + two + b"\n\n"]:
        table = fastparse.seed(body, LIMITS)
        assert table is not None, body
        assert table.column("site").to_pylist() == ["taobao.com", "tmall.com"]
        _agree(table, _exact(ev.parse_seed_body, body, mp))


def test_fast_paths_take_the_common_forms() -> None:
    """Not a vacuous agreement: ordinary batches do go through the fast paths."""
    rows = [{"ts": NOW_MS - i, "site": f"s{i % 3}.com", "path": "/"} for i in range(40)]
    assert fastparse.ndjson(b"\n".join(orjson.dumps(r) for r in rows), LIMITS) is not None
    assert fastparse.json_array(rows, LIMITS) is not None
    seed = b"2020.03.14 07:20:39.595 taobao.com\n2020.03.14 07:25:42.412 tmall.com\n"
    table = fastparse.seed(seed, LIMITS)
    assert table is not None and table.column("ts").to_pylist() == [1584170439595, 1584170742412]


def _dumpable(e: dict[str, Any]) -> bool:
    try:
        orjson.dumps(e)
    except TypeError:
        return False
    return True


def test_lines_and_blank_lines_are_counted_as_a_split_would() -> None:
    def by_split(body: bytes) -> tuple[int, int, bool]:
        lines = body.split(b"\n")
        blank = sum(1 for line in lines if not line.strip())
        if lines[-1] == b"" and len(lines) > 1:
            lines = lines[:-1]
        # "objects" may only be claimed when it is true (it skips a slower check).
        return len(body.split(b"\n")), blank, all(line.startswith(b"{") for line in lines)

    parts = [b"{}", b" ", b"", b"\r", b"\x0b", b"\t\x0c", b" {}", b"{} "]
    for repeat in (1, 2, 4):
        for chosen in itertools.product(parts, repeat=repeat):
            for end in (b"", b"\n", b"\n\n"):
                body = b"\n".join(chosen) + end
                lines, blank, objects = fastparse._line_counts(body)
                want = by_split(body)
                assert (lines, blank) == want[:2], body
                assert not objects or want[2], body


DAY_MS = 86_400_000


def test_seed_times_agree_with_datetime_over_a_century() -> None:
    """The fast path's date arithmetic against datetime, at 20,000 random instants."""
    rng = random.Random(7)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    lines, want = [], []
    for _ in range(20_000):
        at = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(
            milliseconds=rng.randrange(120 * 365 * DAY_MS)
        )
        lines.append(at.strftime("%Y.%m.%d %H:%M:%S.") + f"{at.microsecond // 1000:03d} s.com")
        want.append((at - epoch) // timedelta(milliseconds=1))
    limits = ev.Limits(now_ms=want[0] + 200 * 365 * DAY_MS, future_skew_ms=0)
    table = fastparse.seed("\n".join(lines).encode(), limits)
    assert table is not None and table.column("ts").to_pylist() == want


def test_a_string_time_after_the_first_line_goes_to_the_exact_parser() -> None:
    """The fast path looks for RFC 3339 times in the first line only; Arrow refuses a
    later one (the column changes from number to string), and the exact parser reads
    the whole body."""
    body = b'{"ts":1584170439595,"site":"a.com"}\n{"ts":"2020-03-14T07:20:40Z","site":"a.com"}'
    first = b'{"ts":"2020-03-14T07:20:40Z","site":"a.com"}\n{"ts":1584170439595,"site":"a.com"}'
    with pytest.MonkeyPatch.context() as m:  # the Arrow path (the C parser reads both)
        m.setattr(fastparse, "_native", None)
        assert fastparse.ndjson(body, LIMITS) is None
        table = ev.parse_ndjson_body(body, LIMITS)
        assert fastparse.ndjson(first, LIMITS) is None
        assert ev.parse_ndjson_body(first, LIMITS).num_rows == 2
    assert table.column("ts").to_pylist() == [1_584_170_439_595, 1_584_170_440_000]
    assert ev.parse_ndjson_body(body, LIMITS).equals(table)  # with the C parser, if built
