"""Tests for flowray.ingest.events: every body form, every kind of bad input, and log files."""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, date, datetime
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.ingest.events import (
    EVENT_SCHEMA,
    TS_MIN_MS,
    BatchRejected,
    ItemError,
    Limits,
    check_ts_range,
    detect_format,
    iter_file,
    parse_json_body,
    parse_ndjson_body,
    parse_seed_body,
    parse_timestamp,
)
from flowray.ingest.visitors_id import visitor_id

NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
LIMITS = Limits(now_ms=NOW_MS)
T_2020 = 1_584_170_439_595  # 2020-03-14T07:20:39.595Z


def ms(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return int(moment.timestamp() * 1000 + 0.5) if moment.tzinfo else -1


def rejected(body: bytes, parser=parse_json_body, limits: Limits = LIMITS) -> BatchRejected:
    with pytest.raises(BatchRejected) as info:
        parser(body, limits)
    return info.value


# --------------------------------------------------------------------------- timestamps


def test_ts_min_is_2000() -> None:
    assert ms("2000-01-01T00:00:00+00:00") == TS_MIN_MS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2020-03-14T07:20:39.595Z", T_2020),
        ("2020-03-14T15:20:39.595+08:00", T_2020),
        ("2020-03-13T23:20:39.595-08:00", T_2020),
        ("2020-03-14 07:20:39.595Z", T_2020),
        ("2020-03-14t07:20:39.595z", T_2020),
        ("2020-03-14T07:20:39.595999Z", T_2020),  # truncated to ms, never rounded up
        ("2020-02-29T12:00:00Z", ms("2020-02-29T12:00:00+00:00")),
        (T_2020, T_2020),
        (float(T_2020), T_2020),
        (str(T_2020), T_2020),
        (None, 42),
    ],
)
def test_parse_timestamp_accepts(value: object, expected: int) -> None:
    assert parse_timestamp(value, received_ms=42) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("2020-03-14T07:20:39", "no zone offset"),
        ("2020-03-14", "no zone offset"),
        ("yesterday", "not an RFC 3339 time or epoch milliseconds"),
        ("2019-02-29T00:00:00Z", "not an RFC 3339 time"),
        (True, "boolean"),
        (1.5, "whole number"),
        (float("nan"), "whole number"),
        ([1], "list"),
    ],
)
def test_parse_timestamp_rejects(value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_timestamp(value, received_ms=42)


def test_check_ts_range() -> None:
    check_ts_range(TS_MIN_MS, LIMITS)
    check_ts_range(NOW_MS + 300_000, LIMITS)
    with pytest.raises(ValueError, match="before 2000"):
        check_ts_range(TS_MIN_MS - 1, LIMITS)
    with pytest.raises(ValueError, match="ahead of the server clock"):
        check_ts_range(NOW_MS + 300_001, LIMITS)


# --------------------------------------------------------------------------- JSON bodies


def test_json_batch_good() -> None:
    body = orjson.dumps(
        [
            {
                "ts": "2020-03-14T07:20:39.595Z",
                "site": "Taobao.COM.",
                "path": "/a?b=1",
                "referrer": "https://google.com/",
                "ua": "Mozilla/5.0",
                "visitor": "v1",
                "id": "e1",
                "unknown": {"ignored": True},
                "name": "Signup",
                "props": '{"plan":"pro"}',
            },
            {"ts": T_2020 + 1, "site": "example.com", "id": 12345},
            {"site": "example.com"},
        ]
    )
    table = parse_json_body(body, LIMITS)
    assert table.schema == EVENT_SCHEMA
    assert table.to_pylist() == [
        {
            "ts": T_2020,
            "site": "taobao.com",
            "path": "/a?b=1",
            "referrer": "https://google.com/",
            "ua": "Mozilla/5.0",
            "visitor": "v1",
            "id": "e1",
            "name": "Signup",
            "props": '{"plan":"pro"}',
        },
        {
            "ts": T_2020 + 1,
            "site": "example.com",
            "path": None,
            "referrer": None,
            "ua": None,
            "visitor": None,
            "id": "12345",
            "name": None,
            "props": None,
        },
        {
            "ts": NOW_MS,
            "site": "example.com",
            "path": None,
            "referrer": None,
            "ua": None,
            "visitor": None,
            "id": None,
            "name": None,
            "props": None,
        },
    ]


def test_json_single_object_body() -> None:
    table = parse_json_body(b'{"site": "example.com", "ts": "2020-03-14T07:20:39.595Z"}', LIMITS)
    assert table.column("ts").to_pylist() == [T_2020]
    assert table.column("site").to_pylist() == ["example.com"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[{", "malformed JSON: "),
        (b"", "malformed JSON: "),
        (b"[]", "empty batch"),
        (b'"text"', "body: must be a JSON array of events or one event object"),
    ],
)
def test_json_body_level_errors(body: bytes, reason: str) -> None:
    error = rejected(body)
    assert len(error.errors) == 1
    assert error.errors[0].position == -1
    assert error.errors[0].reason.startswith(reason)


def test_json_lists_every_bad_item_with_its_position() -> None:
    good = {"ts": T_2020, "site": "example.com"}
    items = [
        good,
        5,  # 1: not an object
        {"ts": T_2020},  # 2: missing site
        {"ts": T_2020, "site": 7},  # 3: site not a string
        {"ts": T_2020, "site": ""},  # 4: empty site
        {"ts": T_2020, "site": "http://x.com/a"},  # 5: not a host name
        good,
        {"ts": "next tuesday", "site": "example.com"},  # 7: unparsable ts
        {"ts": 0, "site": "example.com"},  # 8: 1970
        {"ts": "3000-01-01T00:00:00Z", "site": "example.com"},  # 9: year 3000
        {"ts": NOW_MS + 300_001, "site": "example.com"},  # 10: beyond the skew
        {"ts": True, "site": "example.com"},  # 11: boolean ts
        {"ts": [], "site": "example.com"},  # 12: ts neither string nor int
        {"ts": T_2020, "site": "example.com", "path": 5},  # 13
        {"ts": T_2020, "site": "example.com", "referrer": False},  # 14
        {"ts": T_2020, "site": "example.com", "ua": {}},  # 15
        {"ts": T_2020, "site": "example.com", "visitor": 1},  # 16
        {"ts": T_2020, "site": "example.com", "id": 1.5},  # 17
        {"ts": T_2020, "site": "example.com", "path": "/" + "a" * 2048},  # 18
        {"ts": T_2020, "site": "example.com", "visitor": "v" * 129},  # 19
        {"ts": T_2020, "site": "example.com", "id": "i" * 129},  # 20
        {"ts": "2020-03-14T07:20:39", "site": "example.com"},  # 21: naive
        {"ts": NOW_MS + 300_000, "site": "example.com", "path": "/" + "a" * 2047},
    ]
    error = rejected(orjson.dumps(items))
    assert error.total_errors == 20
    reasons = {e.position: e.reason for e in error.errors}
    assert sorted(reasons) == [1, 2, 3, 4, 5, *range(7, 22)]
    assert reasons[1] == "event: must be a JSON object, not number"
    assert reasons[2] == "site: missing"
    assert reasons[3] == "site: must be a string, not number"
    assert reasons[4] == "site: site is empty"
    assert reasons[5].startswith("site: site 'http://x.com/a' is not a valid host name")
    assert reasons[7].startswith("ts: not an RFC 3339 time or epoch milliseconds")
    assert reasons[8] == "ts: time 1970-01-01T00:00:00.000Z is before 2000-01-01T00:00:00Z"
    assert reasons[9].startswith("ts: time 3000-01-01T00:00:00.000Z is more than 300 s ahead")
    assert "ahead of the server clock" in reasons[10]
    assert "boolean" in reasons[11]
    assert reasons[12].startswith("ts: must be an RFC 3339 string or epoch milliseconds")
    assert reasons[13] == "path: must be a string, not number"
    assert reasons[14] == "referrer: must be a string, not boolean"
    assert reasons[15] == "ua: must be a string, not object"
    assert reasons[16] == "visitor: must be a string, not number"
    assert reasons[17] == "id: must be a string, not number"
    assert reasons[18] == "path: longer than 2048 characters (2049)"
    assert reasons[19] == "visitor: longer than 128 characters (129)"
    assert reasons[20] == "id: longer than 128 characters (129)"
    assert "no zone offset" in reasons[21]
    assert "20 bad items" in str(error)


def test_json_item_with_several_problems_names_them_all() -> None:
    error = rejected(orjson.dumps([{"site": "", "ts": "x", "path": 1}]))
    assert [e.position for e in error.errors] == [0]
    reason = error.errors[0].reason
    assert "site:" in reason and "ts:" in reason and "path:" in reason


def test_json_too_many_items() -> None:
    limits = Limits(now_ms=NOW_MS, batch_events_max=3)
    body = orjson.dumps([{"site": "example.com"}] * 4)
    error = rejected(body, limits=limits)
    assert error.errors == [ItemError(-1, "batch has 4 events; at most 3 are allowed")]
    assert parse_json_body(orjson.dumps([{"site": "example.com"}] * 3), limits).num_rows == 3


def test_error_list_is_capped_but_counted() -> None:
    error = rejected(orjson.dumps([{"site": ""}] * 1500))
    assert len(error.errors) == 1000
    assert error.total_errors == 1500
    assert [e.position for e in error.errors] == list(range(1000))


_text = st.text(max_size=40)
_event = st.fixed_dictionaries(
    {
        "ts": st.one_of(
            st.integers(TS_MIN_MS, NOW_MS + 300_000),
            st.datetimes(
                min_value=datetime(2000, 1, 2),
                max_value=datetime(2023, 11, 1),
                timezones=st.just(UTC),
            ).map(lambda d: d.isoformat()),
        ),
        "site": st.sampled_from(["example.com", "Taobao.com", "a-b.c.org", "xn--bcher-kva.de"]),
    },
    optional={
        "path": _text,
        "referrer": _text,
        "ua": _text,
        "visitor": _text,
        "id": st.one_of(_text, st.integers(0, 2**63 - 1)),
    },
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_event, min_size=1, max_size=20))
def test_json_round_trip(events: list[dict[str, object]]) -> None:
    table = parse_json_body(orjson.dumps(events), LIMITS)
    assert table.schema == EVENT_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == len(events)
    for row, event in zip(rows, events, strict=True):
        ts = event["ts"]
        expected_ts = ts if isinstance(ts, int) else parse_timestamp(ts, 0)
        assert row["ts"] == expected_ts
        assert row["site"] == str(event["site"]).lower()
        for name in ("path", "referrer", "ua", "visitor"):
            assert row[name] == event.get(name)
        assert row["id"] == (str(event["id"]) if event.get("id", "") != "" else None)


# --------------------------------------------------------------------------- NDJSON


def test_ndjson_good_with_blank_lines() -> None:
    body = (
        b'{"site": "example.com", "ts": "2020-03-14T07:20:39.595Z"}\n'
        b"\n"
        b"   \r\n"
        b'{"site": "other.org", "ts": 1584170439596, "path": "/x"}\r\n'
    )
    table = parse_ndjson_body(body, LIMITS)
    assert table.column("ts").to_pylist() == [T_2020, T_2020 + 1]
    assert table.column("site").to_pylist() == ["example.com", "other.org"]
    assert table.column("path").to_pylist() == [None, "/x"]


def test_ndjson_positions_are_line_indexes() -> None:
    body = (
        b'{"site": "example.com"}\n'
        b"\n"
        b"{not json\n"
        b'{"site": "example.com"}\n'
        b"[1, 2]\n"
        b'{"site": "example.com", "ts": 5}\n'
    )
    error = rejected(body, parse_ndjson_body)
    assert [e.position for e in error.errors] == [2, 4, 5]
    assert error.errors[0].reason.startswith("malformed JSON: ")
    assert error.errors[1].reason == "event: must be a JSON object, not array"
    assert error.errors[2].reason.startswith("ts: time 1970-01-01T00:00:00.005Z is before")


def test_ndjson_empty_and_too_many() -> None:
    assert rejected(b"\n \n", parse_ndjson_body).errors == [ItemError(-1, "empty batch")]
    limits = Limits(now_ms=NOW_MS, batch_events_max=2)
    body = b'{"site": "a.com"}\n\n{"site": "a.com"}\n{"site": "a.com"}\n'
    error = rejected(body, parse_ndjson_body, limits)
    assert error.errors == [ItemError(-1, "batch has 3 events; at most 2 are allowed")]


def test_ndjson_invalid_utf8_names_the_line() -> None:
    error = rejected(b'{"site": "a.com"}\n{"site": "\xff"}\n', parse_ndjson_body)
    assert error.errors == [ItemError(1, "line: not valid UTF-8")]


# --------------------------------------------------------------------------- seed form


def test_seed_good() -> None:
    body = (
        b"2020.03.14 07:20:39.595 taobao.com\n"
        b"\n"
        b"2020.02.29 23:59:59 Example.COM\r\n"
        b"2020.03.14 07:20:39.5 taobao.com\n"
    )
    table = parse_seed_body(body, LIMITS)
    assert table.schema == EVENT_SCHEMA
    assert table.column("ts").to_pylist() == [
        T_2020,
        ms("2020-02-29T23:59:59+00:00"),
        T_2020 - 95,
    ]
    assert table.column("site").to_pylist() == ["taobao.com", "example.com", "taobao.com"]
    assert table.column("path").null_count == 3


def test_seed_lists_every_bad_line() -> None:
    body = (
        b"2020.03.14 07:20:39.595 taobao.com\n"  # 0 good
        b"garbage\n"  # 1
        b"2019.02.29 00:00:00 taobao.com\n"  # 2 no such day
        b"2020.03.14 24:00:00 taobao.com\n"  # 3 no such hour
        b"2020.03.14 07:20:60 taobao.com\n"  # 4 no such second
        b"1999.12.31 23:59:59.999 taobao.com\n"  # 5 before 2000
        b"3000.01.01 00:00:00 taobao.com\n"  # 6 far future
        b"2020.03.14 07:20:39 bad_site!\n"  # 7 invalid site
        b"2020.03.14 07:20:39\n"  # 8 missing site
        b"\n"
        b"2020.03.14 07:20:39 a.com extra\n"  # 10 trailing junk
    )
    error = rejected(body, parse_seed_body)
    reasons = {e.position: e.reason for e in error.errors}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert reasons[1].startswith("line: expected 'yyyy.mm.dd HH:MM:SS[.fff] site'")
    assert reasons[2] == "ts: date 2019.02.29 does not exist"
    assert reasons[3] == "ts: time of day 24:00:00 is not valid"
    assert reasons[4] == "ts: time of day 07:20:60 is not valid"
    assert reasons[5] == "ts: time 1999-12-31T23:59:59.999Z is before 2000-01-01T00:00:00Z"
    assert "ahead of the server clock" in reasons[6]
    assert reasons[7].startswith("site: site 'bad_site!' is not a valid host name")
    assert reasons[8].startswith("site: missing")
    assert reasons[10].startswith("line: ")


# --------------------------------------------------------------------------- files

COMBINED_LINES = [
    # The Apache documentation's own example.
    '127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326 '
    '"http://www.example.com/start.html" "Mozilla/4.08 [en] (Win98; I ;Nav)"',
    # IPv6 client, '-' referrer, escaped quotes in the user agent, positive offset.
    '2001:db8::1 - - [29/Feb/2020:23:59:59 +0530] "GET /leap?x=1 HTTP/1.1" 304 - "-" '
    '"curl \\"quoted\\" agent"',
    # Garbage request line (a TLS handshake sent to the HTTP port): still a hit.
    '203.0.113.9 - - [14/Mar/2020:07:20:39 +0000] "\\x16\\x03\\x01\\x00\\xa5" 400 157 "-" "-"',
    # Empty request line.
    '203.0.113.9 - - [14/Mar/2020:07:20:40 +0000] "-" 408 0 "-" "-"',
    # Common log format: no referrer or user agent.
    '10.0.0.1 - - [14/Mar/2020:07:20:41 +0000] "POST /api HTTP/1.1" 201 12',
    # Nginx with "$http_x_forwarded_for" and more appended.
    '10.0.0.2 - - [14/Mar/2020:07:20:42 +0000] "GET / HTTP/2.0" 200 612 "https://a.com/" '
    '"Mozilla/5.0" "198.51.100.1, 10.0.0.1" rt=0.001',
]


def _write(path: Path, lines: list[str], compress: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


SALT = bytes(range(32))


def _salt_of_day(_day: date) -> bytes:
    return SALT


def _read_all(path: Path, fmt: str, **kwargs: object) -> tuple[list[dict], list[ItemError]]:
    rows: list[dict] = []
    bad: list[ItemError] = []
    kwargs.setdefault("salt_of_day", _salt_of_day)
    for chunk in iter_file(path, fmt, LIMITS, **kwargs):  # type: ignore[arg-type]
        assert chunk.events.schema == EVENT_SCHEMA
        rows.extend(chunk.events.to_pylist())
        bad.extend(chunk.bad)
    return rows, bad


def test_combined_real_world_shapes(tmp_path: Path) -> None:
    path = _write(tmp_path / "access.log", COMBINED_LINES)
    rows, bad = _read_all(path, "combined", site="Example.com", with_ids=False)
    assert bad == []
    assert [r["site"] for r in rows] == ["example.com"] * 6
    assert rows[0] == {
        "ts": ms("2000-10-10T13:55:36-07:00"),
        "site": "example.com",
        "path": "/apache_pb.gif",
        "referrer": "http://www.example.com/start.html",
        "ua": "Mozilla/4.08 [en] (Win98; I ;Nav)",
        # The client address is hashed with the day's salt, never stored.
        "visitor": visitor_id(
            SALT, "example.com", "127.0.0.1", "Mozilla/4.08 [en] (Win98; I ;Nav)"
        ),
        "id": None,
        "name": None,
        "props": None,
    }
    assert rows[1]["ts"] == ms("2020-02-29T23:59:59+05:30")
    assert rows[1]["visitor"] == visitor_id(
        SALT, "example.com", "2001:db8::1", 'curl "quoted" agent'
    )
    assert all("127.0.0.1" not in str(r) and "2001:db8" not in str(r) for r in rows)
    assert rows[1]["referrer"] is None
    assert rows[1]["ua"] == 'curl "quoted" agent'
    assert rows[1]["path"] == "/leap?x=1"
    assert rows[2]["path"] is None and rows[2]["ua"] is None
    assert rows[3]["path"] is None
    assert rows[4]["path"] == "/api" and rows[4]["referrer"] is None and rows[4]["ua"] is None
    assert rows[5]["path"] == "/" and rows[5]["referrer"] == "https://a.com/"
    assert rows[5]["ua"] == "Mozilla/5.0"


def test_combined_file_reports_garbage_lines_and_keeps_good_ones(tmp_path: Path) -> None:
    lines = [
        COMBINED_LINES[0],
        "this is not a log line",  # 2
        "",
        COMBINED_LINES[1],
        '1.2.3.4 - - [32/Mar/2020:07:20:39 +0000] "GET / HTTP/1.1" 200 1 "-" "-"',  # 5
        '1.2.3.4 - - [14/Mar/1999:07:20:39 +0000] "GET / HTTP/1.1" 200 1 "-" "-"',  # 6
        '1.2.3.4 - - [14/Mar/2020:07:20:39] "GET / HTTP/1.1" 200 1 "-" "-"',  # 7 no offset
        COMBINED_LINES[2],
    ]
    path = _write(tmp_path / "access.log", lines)
    chunks = list(
        iter_file(
            path, "combined", LIMITS, site="example.com", chunk_lines=3, salt_of_day=_salt_of_day
        )
    )
    assert [c.lines for c in chunks] == [3, 3, 2]
    assert sum(c.bytes for c in chunks) == path.stat().st_size
    bad = [e for c in chunks for e in c.bad]
    assert [e.position for e in bad] == [2, 5, 6, 7]
    assert bad[0].reason.startswith("line: not a combined or common log line")
    assert bad[1].reason == "ts: date 32/Mar/2020 does not exist"
    assert bad[2].reason.startswith("ts: time 1999-03-14T07:20:39.000Z is before 2000")
    assert bad[3].reason.startswith("ts: not a log time")
    assert sum(c.events.num_rows for c in chunks) == 3


def test_combined_requires_a_site(tmp_path: Path) -> None:
    path = _write(tmp_path / "access.log", COMBINED_LINES)
    with pytest.raises(ValueError, match="site"):
        list(iter_file(path, "combined", LIMITS, salt_of_day=_salt_of_day))
    with pytest.raises(ValueError, match="not a valid host name"):
        list(iter_file(path, "combined", LIMITS, site="not a site", salt_of_day=_salt_of_day))
    with pytest.raises(ValueError, match="salts"):
        list(iter_file(path, "combined", LIMITS, site="example.com"))


def test_gzip_file_and_auto_detection(tmp_path: Path) -> None:
    path = _write(tmp_path / "access.log.gz", COMBINED_LINES, compress=True)
    rows, bad = _read_all(path, "auto", site="example.com")
    assert bad == [] and len(rows) == 6
    assert rows[0]["path"] == "/apache_pb.gif"


def test_seed_file_with_site_override(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "seed.txt",
        ["2020.03.14 07:20:39.595 taobao.com", "2020.03.14 07:20:40", "junk"],
    )
    rows, bad = _read_all(path, "auto", site="override.com")
    assert [r["site"] for r in rows] == ["override.com", "override.com"]
    assert [r["ts"] for r in rows] == [T_2020, T_2020 + 405]
    assert [e.position for e in bad] == [3]


def test_ndjson_file_own_id_wins_and_site_fills(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "events.ndjson",
        [
            '{"ts": 1584170439595, "id": "own"}',
            '{"ts": 1584170439595, "site": "kept.com"}',
            "{broken",
        ],
    )
    rows, bad = _read_all(path, "ndjson")
    assert [e.position for e in bad] == [1, 3]
    assert bad[0].reason == "site: missing"
    rows, bad = _read_all(path, "ndjson", site="filled.com")
    assert [e.position for e in bad] == [3]
    assert rows[0]["id"] == "own"
    assert rows[1]["site"] == "filled.com"
    line = '{"ts": 1584170439595, "site": "kept.com"}'
    expected = hashlib.blake2b(f"events.ndjson\x002\x00{line}".encode()).hexdigest()[:16]
    assert rows[1]["id"] == expected


def test_ids_are_deterministic_and_per_line(tmp_path: Path) -> None:
    lines = ["2020.03.14 07:20:39.595 taobao.com"] * 2
    first = _read_all(_write(tmp_path / "a.log", lines), "seed")[0]
    again = _read_all(tmp_path / "a.log", "seed")[0]
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert first[0]["id"] != first[1]["id"]  # same text, different line: two hits
    assert all(len(r["id"]) == 16 for r in first)
    expected = hashlib.blake2b(f"a.log\x001\x00{lines[0]}".encode()).hexdigest()[:16]
    assert first[0]["id"] == expected
    renamed = _read_all(_write(tmp_path / "b.log", lines), "seed")[0]
    assert renamed[0]["id"] != first[0]["id"]


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.log", ["x"])
    with pytest.raises(ValueError, match="unknown format"):
        list(iter_file(path, "csv", LIMITS))
    with pytest.raises(ValueError, match="cannot detect"):
        list(iter_file(path, "auto", LIMITS))


def test_detect_format() -> None:
    assert detect_format(["", "2020.03.14 07:20:39.595 taobao.com"]) == "seed"
    assert detect_format(['{"site": "a.com"}', "garbage"]) == "ndjson"
    assert detect_format([*COMBINED_LINES, "garbage"]) == "combined"
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format(["garbage", "more garbage", COMBINED_LINES[0]])
    with pytest.raises(ValueError, match="no non-blank lines"):
        detect_format(["", "  "])
