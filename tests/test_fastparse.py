"""The vectorized fast paths agree with the exact parsers, differentially.

For any body: when a fast path answers, the exact parser must accept the body and give
the very same table; when the exact parser rejects a body, the fast path must decline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray import events as ev
from flowray import fastparse

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
def test_json_array_fast_path_agrees(events: list[dict[str, Any]]) -> None:
    items = [e for e in events if _dumpable(e)]
    body = orjson.dumps(items)
    mp = pytest.MonkeyPatch()
    _agree(fastparse.json_array(orjson.loads(body), LIMITS), _exact(ev.parse_json_body, body, mp))


seed_lines = st.lists(
    st.tuples(
        st.sampled_from(["2020.03.14", "2020.02.30", "2020.3.14", "1999.12.31", "2100.01.01"]),
        st.sampled_from(["07:20:39.595", "07:20:39", "25:00:00.000", "07:20:39.5", "23:59:59.999"]),
        sites,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(seed_lines)
def test_seed_fast_path_agrees(lines: list[tuple[str, str, str]]) -> None:
    body = "\n".join(f"{d} {t} {s}" for d, t, s in lines).encode()
    mp = pytest.MonkeyPatch()
    _agree(fastparse.seed(body, LIMITS), _exact(ev.parse_seed_body, body, mp))


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
