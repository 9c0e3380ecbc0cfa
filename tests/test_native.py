"""The C NDJSON parser (flowray/ingest/_native.c) agrees with the exact parser, differentially.

Whenever it answers, the exact parser must accept the body and give the very same
table; it may decline anything (the Arrow path and the exact parser then judge). The
bodies here stress JSON's syntax — spacing, key order, unknown keys of every type,
escapes, nesting, repeats, torn lines — and random byte mutations of good bodies.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.core import router
from flowray.ingest import events as ev
from flowray.ingest import fastparse
from tests.native_fuzz import mutate

NOW_MS = 1_795_600_000_000
LIMITS = ev.Limits(now_ms=NOW_MS, batch_events_max=50)

native = pytest.mark.skipif(fastparse._native is None, reason="the C parser is not built")


def test_the_c_parser_is_built_where_a_compiler_is() -> None:
    """setup.py builds it as optional: a machine with a compiler must not quietly lose it."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine")
    assert fastparse._native is not None, "flowray.ingest._native was not built: pip install -e ."


def _exact(body: bytes, form: str = "ndjson") -> pa.Table | None:
    with pytest.MonkeyPatch.context() as m:
        for name in ("ndjson", "seed", "json_array"):
            m.setattr(fastparse, name, lambda *_a, **_k: None)
        m.setattr(fastparse, "_native", None)
        parse = ev.parse_ndjson_body if form == "ndjson" else ev.parse_json_body
        try:
            return parse(body, LIMITS)
        except ev.BatchRejected:
            return None


def _native(body: bytes, form: str = "ndjson") -> pa.Table | None:
    parse = fastparse.native_ndjson if form == "ndjson" else fastparse.native_json
    return parse(body, LIMITS)


def _agree(body: bytes, form: str = "ndjson") -> pa.Table | None:
    fast = _native(body, form)
    if fast is not None:
        exact = _exact(body, form)
        assert exact is not None, f"the C parser accepted a body the exact parser rejects: {body!r}"
        assert fast.equals(exact), (body, fast.to_pylist()[:3], exact.to_pylist()[:3])
    return fast


# ---- bodies written token by token, in every spelling JSON allows and some it does not

SPACE = st.sampled_from(["", "", " ", "\t", "  ", "\r", " \r"])
STRING_VALUES = st.sampled_from(
    [
        "",
        "/",
        "/a/b?q=1",
        "é",
        "日本",
        "🙂",
        'a\\"b',  # an escape: the C parser declines
        "\\u00e9",
        "x" * 129,
        "x" * 2049,
        "tab\there",  # a raw control character: invalid JSON
    ]
)
SITES = st.sampled_from(["a.com", "B.com", "shop.example.", " a.com", "bad site", "", "ok-1.io"])
NUMBERS = st.sampled_from(
    [
        "0",
        "-0",
        "7",
        "1.5",
        "-2.5e3",
        "1e400",
        "01",
        "1.",
        "-",
        "123456789012345678901234567890",
        str(NOW_MS),
        str(NOW_MS + 400_000),
        str(NOW_MS - 1),
        f"{NOW_MS}.0",
        f"{NOW_MS}e0",
        "946684799999",
        "946684800000",
    ]
)
LITERALS = st.sampled_from(["true", "false", "null", "nul", "True", "[]", "{}", '{"a":1}', "[1,2]"])


GOOD_STRINGS = st.sampled_from(["", "/", "/a/b?q=1", "é", "日本", "🙂", "v" * 128])
GOOD_TS = st.integers(NOW_MS - 10_000_000, NOW_MS + 300_000).map(str) | st.integers(
    NOW_MS - 10_000_000, NOW_MS + 300_000
).map(lambda ms: '"' + _rfc3339(ms) + '"')


def _rfc3339(ms: int, offset_minutes: int = 0, fraction: str | None = None) -> str:
    """An RFC 3339 time of ``ms`` in a zone ``offset_minutes`` east of UTC."""
    zone = timezone(timedelta(minutes=offset_minutes))
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(zone)
    if fraction is None:
        fraction = f".{ms % 1000:03d}"
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction
    if offset_minutes == 0:
        return text + "Z"
    sign, minutes = ("+" if offset_minutes > 0 else "-"), abs(offset_minutes)
    return f"{text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@st.composite
def value(draw: st.DrawFn, field: str) -> str:
    """Mostly what the field takes, sometimes anything at all."""
    kind = draw(st.integers(0, 19))
    if field == "site" and kind < 17:
        return orjson.dumps(draw(SITES)).decode()
    if field == "ts" and kind < 17:
        return draw(GOOD_TS) if kind < 12 else draw(NUMBERS)
    if field in ("path", "referrer", "ua", "visitor", "id") and kind < 15:
        return "null" if kind == 0 else '"' + draw(GOOD_STRINGS) + '"'
    if kind < 8:
        return '"' + draw(STRING_VALUES) + '"'
    if kind < 14:
        return draw(NUMBERS)
    return draw(LITERALS)


FIELDS = st.sampled_from(["ts", "path", "referrer", "ua", "visitor", "id"]) | st.sampled_from(
    ["extra", "Site", "s\\u0069te", "ts"]
)


@st.composite
def line(draw: st.DrawFn) -> str:
    names = draw(st.lists(FIELDS, max_size=4, unique=True))
    if draw(st.integers(0, 3)):
        names = ["site", *names]  # usually a site
    members = []
    for name in names:
        s = [draw(SPACE) for _ in range(4)]
        members.append(f'{s[0]}"{name}"{s[1]}:{s[2]}{draw(value(name))}{s[3]}')
    text = draw(SPACE) + "{" + ",".join(members) + "}" + draw(SPACE)
    damage = draw(st.integers(0, 39))
    if damage == 0 and text:
        text = text[: draw(st.integers(0, len(text) - 1))]  # a torn line
    elif damage == 1:
        text += draw(st.sampled_from(["x", ",", "}", "{}", " 1"]))  # something after
    elif damage == 3 and members:
        text = text.replace("}", "," + members[0] + "}", 1)  # a repeated field
    elif damage == 2:
        text = draw(st.sampled_from(["", " ", "\t", "\r", "\x0b", "\x0c", "null", "[]", "1"]))
    return text


@settings(max_examples=1500, deadline=None)
@given(st.lists(line(), min_size=1, max_size=4), st.sampled_from(["\n", "\r\n"]), st.booleans())
@native
def test_the_c_parser_agrees_on_any_spelling(lines: list[str], eol: str, final: bool) -> None:
    body = (eol.join(lines) + (eol if final else "")).encode()
    _agree(body)


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(line(), min_size=1, max_size=4),
    st.sampled_from([",", ", ", ",\n", "\n,\n", " ,\t"]),
    st.sampled_from(["", " ", "\n", "\r\n "]),
    st.booleans(),
)
@native
def test_the_c_parser_agrees_on_any_spelling_of_a_json_array(
    lines: list[str], comma: str, space: str, bare: bool
) -> None:
    inner = comma.join(lines)
    text = inner if bare and len(lines) == 1 else "[" + space + inner + space + "]"
    _agree((space + text + space).encode(), "json")


@pytest.mark.parametrize("form", ["ndjson", "json"])
@native
def test_random_mutations_of_good_bodies_agree(form: str) -> None:
    """Bytes dropped, doubled or replaced by JSON's significant characters: 30,000
    mutants of a good body, each either declined or parsed exactly as the exact parser."""
    rng = random.Random(20261126)
    rows = [
        {
            "ts": NOW_MS - i,
            "site": f"s{i % 3}.com",
            "path": "/p",
            "ua": "Mozilla/5.0",
            "id": f"e{i}",
        }
        for i in range(4)
    ]
    rows[1]["extra"] = 1.25
    rows[2]["visitor"] = None
    rows[3].pop("ts")
    good = b"\n".join(orjson.dumps(r) for r in rows) + b"\n"
    if form == "json":
        good = orjson.dumps(rows, option=orjson.OPT_INDENT_2)
    alphabet = b'{}[]":,\\ \t\r\n-+.0123456789eEtrufalsn\x00\x1f\xc3\xa9\x80\xed\xf4\xff'
    accepted = 0
    for _ in range(30_000):
        body = mutate(good, rng, alphabet)
        accepted += _agree(body, form) is not None
    assert accepted > 1000  # mutants inside values still parse: the comparison is real


TIME_TEXTS = st.one_of(
    st.builds(
        _rfc3339,
        st.integers(NOW_MS - 400 * 86_400_000, NOW_MS + 400_000),
        st.integers(-23 * 60 - 59, 23 * 60 + 59),
        st.sampled_from(["", ".5", ".12", ".123", ".1234", ".123456", ".1234567", ".123456789"])
        | st.sampled_from([".", ",5", ".1234567890", ".12a"]),
    ),
    st.sampled_from(
        [
            "2024-02-29T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2000-02-29T12:00:00Z",
            "2020-03-14T07:20:60Z",
            "2020-03-14T24:00:00Z",
            "2020-13-14T07:20:39Z",
            "2020-00-14T07:20:39Z",
            "2020-03-00T07:20:39Z",
            "2020-04-31T07:20:39Z",
            "2020-03-14t07:20:39z",
            "2020-03-14 07:20:39Z",
            "2020-03-14T07:20:39",
            "2020-03-14T07:20:39+24:00",
            "2020-03-14T07:20:39+05:30:15",
            "2020-03-14T07:20:39+0530",
            "2020-03-14T07:20Z",
            "20200314T072039Z",
            " 2020-03-14T07:20:39Z",
            "2020-03-14T07:20:39Z ",
            str(NOW_MS),
            "0" + str(NOW_MS),
            str(NOW_MS) + "0",
            "",
            "１７９５６０００００００",
        ]
    ),
)


@settings(max_examples=3000, deadline=None)
@given(TIME_TEXTS, st.sampled_from(["ndjson", "json"]))
@native
def test_quoted_times_are_read_as_the_exact_parser_reads_them(text: str, form: str) -> None:
    body = orjson.dumps({"site": "a.com", "ts": text})
    limits = ev.Limits(now_ms=NOW_MS, batch_events_max=5)
    parse = fastparse.native_ndjson if form == "ndjson" else fastparse.native_json
    fast = parse(body, limits)
    if fast is not None:
        exact = _exact(body, form)
        assert exact is not None, f"the C parser took a time the exact parser refuses: {text}"
        assert fast.equals(exact), text


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(st.text(max_size=20), min_size=1, max_size=3),
    st.booleans(),
    st.sampled_from(["ndjson", "json"]),
)
@native
def test_escaped_strings_decode_as_the_exact_parser_decodes_them(
    values: list[str], slashes: bool, form: str
) -> None:
    """Python's json.dumps escapes every non-ASCII character (surrogate pairs beyond
    the BMP) and control character; some encoders escape "/" too."""
    rows = [{"site": "a.com", "ts": NOW_MS, "path": v, "ua": v[::-1], "x": v} for v in values]
    text = "\n".join(json.dumps(r) for r in rows) if form == "ndjson" else json.dumps(rows)
    if slashes:
        text = text.replace("/", "\\/")
    _agree(text.encode(), form)


@native
def test_strings_scanned_a_word_at_a_time_agree_at_every_position() -> None:
    """Plain ASCII is scanned 8 bytes at a time: raw UTF-8, an escape, DEL or a raw
    control character at every position of strings around word sizes, and a body cut
    after every byte; each is declined or parsed as the exact parser parses it, and
    the valid ones take the C path."""
    valid = ["é", "😀", r"\"", r"\\", r"\u00e9", r"\t", "\x7f"]
    invalid = ["\x01", "\t"]
    for length in range(26):
        for at in range(length + 1):
            for special in valid + invalid:
                text = "a" * at + special + "b" * (length - at)
                body = f'{{"site":"a.com","ts":{NOW_MS},"path":"/{text}","ua":"{text}"}}'
                table = _agree(body.encode())
                assert (table is not None) == (special in valid), body
    ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120"
    body = json.dumps({"site": "a.com", "ts": NOW_MS, "path": "/a/é/b", "ua": ua}).encode()
    assert _agree(body) is not None
    for cut in range(len(body)):
        _agree(body[:cut])


@native
def test_the_usual_escapes_take_the_c_path() -> None:
    values = ["/blog/post", "café", "😀", '"quoted"', "tab\tnew\nline", "back\\slash", "é" * 128]
    body = "\n".join(
        json.dumps({"site": "a.com", "ts": NOW_MS, "path": v, "visitor": v[:128]}).replace(
            "/", "\\/"
        )
        for v in values
    ).encode()
    assert b"\\u00e9" in body and b"\\ud83d\\ude00" in body and b"\\/" in body
    table = _agree(body)
    assert table is not None and table.column("path").to_pylist() == values


@native
def test_the_usual_quoted_times_take_the_c_path() -> None:
    for text, ms in [
        ("2026-11-25T09:00:00Z", 1_795_597_200_000),
        ("2026-11-25T09:00:00.123Z", 1_795_597_200_123),
        ("2026-11-25T09:00:00.5+01:00", 1_795_593_600_500),
        ("2026-11-25T03:30:00-05:30", 1_795_597_200_000),
        (str(NOW_MS - 1), NOW_MS - 1),
    ]:
        table = _agree(orjson.dumps({"site": "a.com", "ts": text}))
        assert table is not None and table.column("ts").to_pylist() == [ms], text


@native
def test_the_usual_tracker_bodies_take_the_c_path() -> None:
    """Not a vacuous agreement: ordinary bodies are parsed in C, with what they hold."""
    rows: list[dict[str, Any]] = [
        {"ts": NOW_MS - 5, "site": "a.com", "path": "/é", "referrer": None, "visitor": "v1"},
        {"site": "B.com", "path": "/", "ua": "Mozilla/5.0 (X11; Linux x86_64)", "id": ""},
        {"ts": NOW_MS, "site": "c.io", "id": "e-3", "screen": 1.5, "dnt": False, "tags": None},
    ]
    body = b"\n".join(orjson.dumps(r) for r in rows) + b"\n\n"
    table = _agree(body)
    assert table is not None
    assert table.to_pylist() == [
        {"ts": NOW_MS - 5, "site": "a.com", "path": "/é", "referrer": None, "ua": None,
         "visitor": "v1", "id": None, "name": None, "props": None},
        {"ts": NOW_MS, "site": "b.com", "path": "/", "referrer": None,
         "ua": "Mozilla/5.0 (X11; Linux x86_64)", "visitor": None, "id": None, "name": None,
         "props": None},
        {"ts": NOW_MS, "site": "c.io", "path": None, "referrer": None, "ua": None,
         "visitor": None, "id": "e-3", "name": None, "props": None},
    ]  # fmt: skip
    spaced = b' { "site" : "a.com" , "ts" : %d } \r\n' % (NOW_MS - 1)
    assert _agree(spaced) is not None
    array = _agree(orjson.dumps(rows, option=orjson.OPT_INDENT_2), "json")
    assert array is not None and array.equals(table)
    assert _agree(orjson.dumps(rows[0]), "json") is not None  # one object, no array


@pytest.mark.parametrize(
    "body",
    [b"[]", b'[{"site":"a.com"},]', b'[{"site":"a.com"}] x', b'{"site":"a.com"}{"site":"b.com"}',
     b'[[{"site":"a.com"}]]', b'[{"site":"a.com"}', b'[{"site":"a.com"} {"site":"b.com"}]',
     b'"a.com"', b"null"],
)  # fmt: skip
@native
def test_the_c_parser_declines_json_it_does_not_know(body: bytes) -> None:
    assert _native(body, "json") is None
    _agree(body, "json")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"site":"a.com","path":"\\ud800"}', "a lone surrogate"),
        (b'{"site":"a.com","path":"\\x"}', "a bad escape"),
        (b'{"site":"a.com","path":"\\u0000"}', "an escaped NUL (the exact parser takes it)"),
        (b'{"site":"a\\u002ecom"}', "an escaped site"),
        (b'{"s\\u0069te":"a.com"}', "an escaped key"),
        (b'{"site":"a.com","ts":"2020-03-14t07:20:39z"}', "a time in lower case"),
        (b'{"site":"a.com","ts":"2020-03-14T07:20:39"}', "a time without a zone"),
        (b'{"site":"a.com","ts":1.5}', "a fractional time"),
        (b'{"site":"a.com","id":7}', "a numeric id (the exact parser keeps it as text)"),
        (b'{"site":"a.com","site":"b.com"}', "a repeated field"),
        (b'{"site":"a.com","x":{"y":1}}', "a nested object"),
        (b'{"ts":%d}' % NOW_MS, "no site"),
        (b'{"site":null}', "a null site"),
        (b'{"site":"a.com","x":1e400}', "a number JSON readers refuse"),
        (b'{"site":"a.com","ts":%d}' % (NOW_MS + 400_000), "a time too far ahead"),
        (b'{"site":"a.com"}\n\x0c\n', "a blank line of form feeds"),
        (b'{"site":"a.com","visitor":"%s"}' % (b"v" * 129), "a visitor too long"),
    ],
)
@native
def test_the_c_parser_declines(body: bytes, why: str) -> None:
    assert _native(body) is None, why


# Byte sequences that Python's strict UTF-8 decoder refuses, and some it takes.
NOT_UTF8 = [
    (b"\x80", "a continuation byte first"),
    (b"\xbf", "another continuation byte first"),
    (b"\xc0\x80", "an overlong NUL"),
    (b"\xc1\xbf", "an overlong two-byte form"),
    (b"\xe0\x80\xaf", "an overlong three-byte form"),
    (b"\xed\xa0\x80", "a high surrogate"),
    (b"\xed\xbf\xbf", "a low surrogate"),
    (b"\xf0\x80\x80\xaf", "an overlong four-byte form"),
    (b"\xf4\x90\x80\x80", "past U+10FFFF"),
    (b"\xf5\x80\x80\x80", "a lead byte past U+10FFFF"),
    (b"\xff", "0xff"),
    (b"\xc3", "a sequence cut by the closing quote"),
    (b"\xe2\x82", "a three-byte sequence cut by the quote"),
    (b"\xf0\x9f\x98", "a four-byte sequence cut by the quote"),
    (b"\xc3\x28", "a lead byte before ASCII"),
]
UTF8 = [b"\xc3\xa9", b"\xe2\x82\xac", b"\xef\xbf\xbf", b"\xf0\x9f\x98\x80", b"\xf4\x8f\xbf\xbf"]


@pytest.mark.parametrize("form", ["ndjson", "json"])
@pytest.mark.parametrize(("raw", "why"), NOT_UTF8)
@native
def test_the_c_parser_declines_bytes_that_are_not_utf8(raw: bytes, why: str, form: str) -> None:
    """The C parser checks UTF-8 itself (its callers no longer do), in every string:
    a value, an unknown field's value, a key; the exact parser then names the error."""
    for body in (
        b'{"site":"a.com","path":"/' + raw + b'"}',
        b'{"site":"a.com","x":"' + raw + b'"}',
        b'{"site":"a.com","' + raw + b'":1}',
        b'{"site":"a.com","path":"/' + raw,  # cut at the end of the body
    ):
        with pytest.raises(UnicodeDecodeError):
            body.decode()
        assert _native(body, form) is None, why
        with pytest.raises(ev.BatchRejected):
            (ev.parse_ndjson_body if form == "ndjson" else ev.parse_json_body)(body, LIMITS)


@pytest.mark.parametrize("form", ["ndjson", "json"])
@native
def test_utf8_characters_count_once_against_the_length_limits(form: str) -> None:
    """Every well-formed sequence, one to four bytes, is one character, as in Python."""
    limits = ev.Limits(now_ms=NOW_MS, batch_events_max=50)
    for char in UTF8:
        fits = b'{"site":"a.com","visitor":"' + char * ev.VISITOR_CHARS_MAX + b'"}'
        table = _agree(fits, form)
        assert table is not None and table.column("visitor")[0].as_py() == fits.decode()[27:-2]
        over = b'{"site":"a.com","visitor":"' + char * (ev.VISITOR_CHARS_MAX + 1) + b'"}'
        parse = fastparse.native_ndjson if form == "ndjson" else fastparse.native_json
        assert parse(over, limits) is None


@given(st.binary(min_size=1, max_size=12))
@settings(max_examples=3000, deadline=None)
@native
def test_any_bytes_in_a_string_are_declined_or_read_as_python_reads_them(raw: bytes) -> None:
    body = b'{"site":"a.com","path":"/' + raw.replace(b'"', b"q").replace(b"\\", b"b") + b'"}'
    try:
        text = body.decode()
    except UnicodeDecodeError:
        assert _native(body) is None
        return
    table = _agree(body)
    if table is not None:
        assert table.column("path")[0].as_py() == orjson.loads(text)["path"]


@pytest.mark.parametrize("form", ["ndjson", "json"])
@native
def test_a_missing_time_is_the_time_of_receipt_only_when_that_is_in_range(form: str) -> None:
    """From a review: the time of receipt stood in for a missing ts unchecked."""
    for limits in (
        ev.Limits(now_ms=1000, batch_events_max=5),  # a clock before 2000
        ev.Limits(now_ms=NOW_MS, future_skew_ms=-1, batch_events_max=5),
    ):
        parse = fastparse.native_ndjson if form == "ndjson" else fastparse.native_json
        assert parse(b'{"site":"a.com"}', limits) is None
        assert parse(b'{"site":"a.com","ts":null}', limits) is None


@native
def test_a_lone_json_object_counts_against_the_batch_limit() -> None:
    assert fastparse.native_json(b'{"site":"a.com"}', ev.Limits(NOW_MS, batch_events_max=0)) is None
    one = fastparse.native_json(b'{"site":"a.com"}', ev.Limits(NOW_MS, batch_events_max=1))
    assert one is not None and one.num_rows == 1


@native
def test_blank_lines_cost_no_buffers() -> None:
    """Buffers are sized by the batch limit, not by a body's (blank) lines."""
    body = b'{"site":"a.com"}' + b"\n" * (8 * 1024 * 1024)
    table = fastparse.native_ndjson(body, LIMITS)
    assert table is not None and table.num_rows == 1


@native
def test_more_events_than_the_batch_limit_are_declined() -> None:
    body = b"\n".join(b'{"site":"a.com"}' for _ in range(LIMITS.batch_events_max + 1))
    assert _native(body) is None
    assert _agree(body.rsplit(b"\n", 1)[0]) is not None


def test_without_the_c_parser_the_arrow_path_still_parses() -> None:
    """A machine without a compiler: the same bodies through Arrow and the exact parser."""
    rows = [{"ts": NOW_MS - i, "site": f"s{i % 3}.com", "path": "/"} for i in range(40)]
    body = b"\n".join(orjson.dumps(r) for r in rows)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fastparse, "_native", None)
        table = fastparse.ndjson(body, LIMITS)
    assert table is not None and table.equals(_exact(body))


@settings(max_examples=2000, deadline=None)
@given(
    st.text(alphabet="abz09-.A Zé\t", max_size=12)
    | st.builds(lambda n, m: "a" * n + "." + "b" * m, st.integers(0, 70), st.integers(0, 200))
)
@native
def test_sites_the_c_parser_calls_normal_are_normal(site: str) -> None:
    """The C parser skips normalize_site for sites it finds already normal: only where
    normalize_site would return them unchanged (else the exact parser disagrees)."""
    body = orjson.dumps({"site": site, "ts": NOW_MS})
    _agree(body)
    parsed = fastparse._native.ndjson(  # type: ignore[union-attr]
        body, NOW_MS, 0, NOW_MS, 2048, 128, 10
    )
    if parsed is not None and parsed[3]:
        assert router.normalize_site(site) == site


@native
def test_usual_sites_are_found_normal_in_c() -> None:
    for site in ("a.com", "shop-1.example.co.uk", "x" * 63 + ".io", "1.2.3.4"):
        parsed = fastparse._native.ndjson(  # type: ignore[union-attr]
            orjson.dumps({"site": site}), NOW_MS, 0, NOW_MS, 2048, 128, 10
        )
        assert parsed is not None and parsed[3], site


@native
def test_the_c_parser_frees_what_it_allocates() -> None:
    """Its buffers are C memory, which tracemalloc does not see: resident memory must
    not grow over thousands of parses, accepted and declined (a leak of one body's
    buffers per call would add hundreds of MiB)."""
    rows = [{"ts": NOW_MS - i, "site": f"s{i % 50}.com", "path": "/p" * 20} for i in range(500)]
    good = b"\n".join(orjson.dumps(r) for r in rows)
    declined = good + b'\n{"site":"a.com","x":[1]}'
    array = orjson.dumps(rows)
    limits = ev.Limits(now_ms=NOW_MS, batch_events_max=1000)

    def resident_mib() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096 / 2**20

    def parse_many() -> None:
        for _ in range(1000):
            assert fastparse.native_ndjson(good, limits) is not None
            assert fastparse.native_ndjson(declined, limits) is None
            assert fastparse.native_json(array, limits) is not None

    parse_many()  # warm: the allocator's arenas settle
    before = resident_mib()
    for _ in range(3):
        parse_many()
    assert resident_mib() - before < 16


def _sanitizer_runtime() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    found = subprocess.run(
        [cc, "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    return found if found.startswith("/") and Path(found).exists() else None


def test_the_c_parser_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    """Built with ASan and UBSan, every prefix of a few bodies and seconds of random
    mutations: an overread or overflow that does not crash the normal build (a field
    index past a fixed array once did only that) aborts this one."""
    runtime = _sanitizer_runtime()
    if runtime is None:
        pytest.skip("no gcc with AddressSanitizer on this machine")
    root = Path(__file__).resolve().parent.parent
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    flags = ["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    subprocess.run(
        ["gcc", *flags, "-fno-omit-frame-pointer", "-shared", "-fPIC", f"-I{include}",
         str(root / "flowray" / "ingest" / "_native.c"), "-o", str(tmp_path / f"_native{suffix}")],
        check=True, timeout=120,
    )  # fmt: skip
    env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0")
    run = subprocess.run(
        [sys.executable, str(root / "tests" / "native_fuzz.py"), str(tmp_path), "4"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
