"""Every event rule at its edge, in every parser: the exact one, the Arrow fast paths and C.

flowray.ingest.rules declares the rules once and the three parsers read them from there,
the C parser through the header it generates. Here the limits are found in RULES (so a
new one cannot go untested), and each parser is given a value just inside a rule, which
it must take itself (a fast path that declined would make the check vacuous), and one
just outside, which it must decline: the body then gets the exact parser's answer,
whichever parsers are built, and that answer is checked word for word.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pyarrow as pa
import pytest

from flowray.core import router
from flowray.ingest import events as ev
from flowray.ingest import fastparse, rules
from flowray.ingest.rules import RULES

NOW_MS = 1_795_600_000_000  # 2026-11-25T09:46:40Z
LIMITS = ev.Limits(now_ms=NOW_MS)  # the rules' defaults for the skew and the batch size
SITE = "a.com"
PARSE = {"ndjson": ev.parse_ndjson_body, "json": ev.parse_json_body, "seed": ev.parse_seed_body}
CONFIGS = ("exact", "arrow", "c")


def _rfc3339(ms: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _seed_time(ms: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return moment.strftime("%Y.%m.%d %H:%M:%S.") + f"{ms % 1000:03d}"


@dataclass(frozen=True)
class Edge:
    """A rule's edge: events just inside it, and (if it refuses anything) just outside.

    ``spelling`` is how the body writes them: "plain", "escaped" (every non-ASCII
    character as \\u escapes) or "rfc3339" (times as text). ``takers`` are the parsers
    that must take the inside events themselves; the others may decline them.
    """

    rule: str
    inside: list[dict[str, Any]]
    outside: list[dict[str, Any]] | None
    reason: str  # of the first outside event; position -1 means the batch as a whole
    stored: tuple[str, Any] | None = None  # a column and its first value inside
    forms: tuple[str, ...] = ("ndjson", "json")
    spelling: str = "plain"
    takers: tuple[str, ...] = CONFIGS
    position: int = 0
    label: str = ""

    @property
    def id(self) -> str:
        return "-".join(x for x in (self.rule, self.label, self.spelling) if x not in ("", "plain"))


def _ts_edges() -> Iterator[Edge]:
    lo, hi = RULES.ts_min_ms, NOW_MS + RULES.future_skew_ms
    ahead = RULES.future_skew_ms // 1000
    for spelling, forms, takers in [
        ("plain", ("ndjson", "json", "seed"), CONFIGS),
        ("rfc3339", ("ndjson", "json"), ("exact", "c")),  # Arrow leaves text to the others
    ]:
        yield Edge(
            "ts_min_ms",
            [{"ts": lo, "site": SITE}],
            [{"ts": lo - 1, "site": SITE}],
            f"ts: time {_rfc3339(lo - 1)} is before {RULES.ts_min_text}",
            ("ts", lo),
            forms,
            spelling,
            takers,
        )
        yield Edge(
            "future_skew_ms",
            [{"ts": hi, "site": SITE}],
            [{"ts": hi + 1, "site": SITE}],
            f"ts: time {_rfc3339(hi + 1)} is more than {ahead} s ahead of the server clock "
            f"({_rfc3339(NOW_MS)})",
            ("ts", hi),
            forms,
            spelling,
            takers,
        )


def _site_edges() -> Iterator[Edge]:
    def site(length: int) -> str:  # labels of 63 and dots, as long as asked
        labels: list[str] = []
        while length > 0:
            labels.append("abcd"[len(labels) % 4] * min(length, RULES.site_label_bytes_max))
            length -= len(labels[-1]) + 1
        return ".".join(labels)

    longest, too_long = site(RULES.site_bytes_max), site(RULES.site_bytes_max + 1)
    assert (len(longest), len(too_long)) == (RULES.site_bytes_max, RULES.site_bytes_max + 1)
    yield Edge(
        "site_bytes_max",
        [{"ts": NOW_MS, "site": longest}],
        [{"ts": NOW_MS, "site": too_long}],
        f"site: site is longer than {RULES.site_bytes_max} characters",
        ("site", longest),
        ("ndjson", "json", "seed"),
    )
    label = "x" * RULES.site_label_bytes_max
    yield Edge(
        "site_label_bytes_max",
        [{"ts": NOW_MS, "site": label + ".com"}],
        [{"ts": NOW_MS, "site": "x" + label + ".com"}],
        f"site: site {'x' + label + '.com'!r} is not a valid host name",
        ("site", label + ".com"),
        ("ndjson", "json", "seed"),
    )


def _batch_edges() -> Iterator[Edge]:
    n = RULES.batch_events_max
    event = {"ts": NOW_MS, "site": SITE}
    yield Edge(
        "batch_events_max",
        [event] * n,
        [event] * (n + 1),
        f"batch has {n + 1} events; at most {n} are allowed",
        forms=("ndjson", "json", "seed"),
        position=-1,
    )


def _length_edges() -> Iterator[Edge]:
    for f in RULES.fields:
        if f.chars_limit is None:
            continue
        n = RULES.chars_max(f.name)
        # One character is one to four bytes, or an escape: each counts once.
        for char, spelling in [("x", "plain"), ("é", "plain"), ("🙂", "plain"), ("é", "escaped")]:
            yield Edge(
                f.chars_limit,
                [{"ts": NOW_MS, "site": SITE, f.name: char * n}],
                [{"ts": NOW_MS, "site": SITE, f.name: char * (n + 1)}],
                f"{f.name}: longer than {n} characters ({n + 1})",
                (f.name, char * n),
                spelling=spelling,
                label=f.name + "-" + (char if char.isascii() else f"U+{ord(char):04X}"),
            )


def _field_edges() -> Iterator[Edge]:
    """What each field must be: its type, whether it may be missing, and its quirks."""
    for f in RULES.fields:
        good: Any = NOW_MS if f.type == "int64" else "b.com"
        reason = (
            "ts: must be an RFC 3339 string or epoch milliseconds, not a boolean"
            if f.type == "int64"
            else f"{f.name}: must be a string, not boolean"
        )
        yield Edge(
            f"{f.name}.type",
            [{"site": SITE, f.name: good}],
            [{"site": SITE, f.name: True}],
            reason,
            (f.name, good),
        )
        if f.required:
            yield Edge(
                f"{f.name}.required",
                [{"ts": NOW_MS, f.name: SITE}],
                [{"ts": NOW_MS}],
                f"{f.name}: missing",
                (f.name, SITE),
            )
        if f.numbers_as_text:  # the fast paths leave numbers in strings to the exact one
            yield Edge(
                f"{f.name}.numbers_as_text",
                [{"site": SITE, f.name: 7}],
                [{"site": SITE, f.name: 1.5}],
                f"{f.name}: must be a string, not number",
                (f.name, "7"),
                takers=("exact",),
            )
        if f.empty_is_null:
            yield Edge(
                f"{f.name}.empty_is_null", [{"site": SITE, f.name: ""}], None, "", (f.name, None)
            )


EDGES = [*_ts_edges(), *_site_edges(), *_batch_edges(), *_length_edges(), *_field_edges()]


def _escaped(value: Any) -> bytes:
    """JSON with every non-ASCII character written as a \\u escape, as json.dumps does."""
    text = json.dumps(value, ensure_ascii=True)
    assert "\\u" in text
    return text.encode()


def _body(edge: Edge, events: list[dict[str, Any]], form: str) -> bytes:
    if form == "seed":
        return "".join(f"{_seed_time(e['ts'])} {e['site']}\n" for e in events).encode()
    if edge.spelling == "rfc3339":
        events = [{**e, "ts": _rfc3339(e["ts"])} for e in events]
    dump: Callable[[Any], bytes] = orjson.dumps
    if edge.spelling == "escaped":
        dump = _escaped
    if form == "json":
        return dump(events)
    return b"\n".join(dump(e) for e in events) + b"\n"


@contextmanager
def _parsers(config: str) -> Iterator[None]:
    """Only the exact parser; or it and the Arrow fast paths; or all three (as built)."""
    with pytest.MonkeyPatch.context() as m:
        if config != "c":
            m.setattr(fastparse, "_native", None)
        if config == "exact":
            for name in ("ndjson", "seed", "json_array"):
                m.setattr(fastparse, name, lambda *_a, **_k: None)
        yield


def _own(config: str, form: str, body: bytes) -> pa.Table | None:
    """What the configuration's own fast path makes of a body, before any fallback."""
    if config == "arrow":
        if form == "json":
            return fastparse.json_array(orjson.loads(body), LIMITS)
        return (fastparse.ndjson if form == "ndjson" else fastparse.seed)(body, LIMITS)
    return (fastparse.native_ndjson if form == "ndjson" else fastparse.native_json)(body, LIMITS)


_EXACT: dict[tuple[str, str], pa.Table] = {}


def _exact_table(edge: Edge, form: str) -> pa.Table:
    """The exact parser's table of the inside events, once per edge and form."""
    key = (edge.id, form)
    if key not in _EXACT:
        with _parsers("exact"):
            _EXACT[key] = PARSE[form](_body(edge, edge.inside, form), LIMITS)
    return _EXACT[key]


CASES = [
    pytest.param(edge, config, form, id=f"{edge.id}-{form}-{config}")
    for edge in EDGES
    for form in edge.forms
    for config in CONFIGS
    if not (config == "c" and form == "seed")  # the C parser reads JSON only
]


@pytest.mark.parametrize(("edge", "config", "form"), CASES)
def test_each_parser_takes_the_inside_of_a_rule_and_refuses_its_outside(
    edge: Edge, config: str, form: str
) -> None:
    if config == "c" and fastparse._native is None:
        pytest.skip("the C parser is not built")
    want = _exact_table(edge, form)
    if edge.stored is not None:
        column, value = edge.stored
        assert want.column(column)[0].as_py() == value
    assert want.num_rows == len(edge.inside)
    inside = _body(edge, edge.inside, form)
    with _parsers(config):
        if config != "exact" and config in edge.takers:
            own = _own(config, form, inside)
            assert own is not None, f"the {config} parser declined a value inside {edge.rule}"
            assert own.equals(want)
        if config != "exact":  # for the exact parser that is want itself
            assert PARSE[form](inside, LIMITS).equals(want)
        if edge.outside is None:
            return
        outside = _body(edge, edge.outside, form)
        if config != "exact":
            assert _own(config, form, outside) is None, f"the {config} parser broke {edge.rule}"
        with pytest.raises(ev.BatchRejected) as info:
            PARSE[form](outside, LIMITS)
    assert info.value.errors == [ev.ItemError(edge.position, edge.reason)]


def test_every_rule_has_its_edges_here() -> None:
    """A rule added to flowray.ingest.rules must be added to EDGES too."""
    want = set(RULES.limits()) | {f"{f.name}.type" for f in RULES.fields}
    for f in RULES.fields:
        for quirk in ("required", "numbers_as_text", "empty_is_null"):
            if getattr(f, quirk):
                want.add(f"{f.name}.{quirk}")
    assert {edge.rule for edge in EDGES} == want
    assert len({edge.id for edge in EDGES}) == len(EDGES)
    assert set(RULES.limits()) == {
        "ts_min_ms",
        "future_skew_ms",
        "batch_events_max",
        "path_chars_max",
        "visitor_chars_max",
        "site_bytes_max",
        "site_label_bytes_max",
    }
    limited = {f.name for f in RULES.fields if f.chars_limit is not None}
    assert limited == {"path", "referrer", "ua", "visitor", "id", "name", "props"}
    for name in limited:  # each field at its own edge, not only one per limit
        assert any(edge.stored is not None and edge.stored[0] == name for edge in EDGES)


def test_the_defaults_and_the_schema_are_the_rules() -> None:
    assert (LIMITS.future_skew_ms, LIMITS.batch_events_max) == (
        RULES.future_skew_ms,
        RULES.batch_events_max,
    )
    assert RULES.ts_min_ms == ev.TS_MIN_MS
    stored = pa.schema(
        [
            pa.field("ts", pa.int64(), nullable=False),
            pa.field("site", pa.string(), nullable=False),
            *(
                pa.field(name, pa.string())
                for name in ("path", "referrer", "ua", "visitor", "id", "name", "props")
            ),
        ]
    )  # what the warehouse holds: a change here is a change of its format
    assert stored == ev.EVENT_SCHEMA
    # normalize_site applies the site rules itself (the edges above check it does).
    assert RULES.site_bytes_max == router.SITE_BYTES_MAX


# --------------------------------------------------------------------------- the C side


def test_the_committed_header_is_what_the_rules_generate() -> None:
    assert rules.HEADER_PATH.read_text() == rules.header(), (
        "flowray/ingest/_rules.h is stale: python -m flowray.ingest.rules --write, "
        "then pip install -e ."
    )


def test_the_generator_prints_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    assert rules.main(["--header"]) == 0
    assert capsys.readouterr().out == rules.header()


def test_the_c_parser_is_built_from_these_rules() -> None:
    if fastparse._native is None:
        pytest.skip("the C parser is not built")
    assert rules.header_digest() == fastparse._native.RULES_DIGEST


def test_a_c_parser_built_from_other_rules_is_not_used() -> None:
    stale = types.SimpleNamespace(RULES_DIGEST="0" * 16)
    with pytest.warns(RuntimeWarning, match="rebuild it"):
        assert fastparse.built_from_these_rules(stale) is None  # type: ignore[arg-type]
    assert fastparse.built_from_these_rules(None) is None
    fresh = types.SimpleNamespace(RULES_DIGEST=rules.header_digest())
    assert fastparse.built_from_these_rules(fresh) is fresh  # type: ignore[arg-type]


@pytest.mark.parametrize("form", ["ndjson", "json"])
def test_the_c_parser_applies_each_length_limit_it_is_given_to_its_fields(form: str) -> None:
    """The limits are arguments; which field each one bounds is the rules' (_rules.h)."""
    native = fastparse._native
    if native is None:
        pytest.skip("the C parser is not built")
    given = {"path_chars_max": 10, "visitor_chars_max": 5}
    parse = native.ndjson if form == "ndjson" else native.json
    for f in RULES.fields:
        if f.chars_limit is None:
            continue
        n = given[f.chars_limit]
        for length, taken in [(n, True), (n + 1, False)]:
            body = orjson.dumps({"site": SITE, f.name: "é" * length})
            parsed = parse(body, NOW_MS, 0, NOW_MS, *given.values(), 10)
            assert (parsed is not None) == taken, (f.name, length)


def test_a_rule_the_c_parser_cannot_follow_is_refused() -> None:
    fields = RULES.fields
    extra = rules.Field("screen", "int64")
    optional_site = dataclasses.replace(fields[1], required=False)
    for changed in [
        (*fields, extra),  # a number column: C reads ts alone as a number
        (fields[0], optional_site, *fields[2:]),
        (*fields[1:], fields[0]),  # ts not first
        (*fields, rules.Field("Screen-Size", "string")),  # not a C name
    ]:
        with pytest.raises(ValueError, match="C parser"):
            rules.header(dataclasses.replace(RULES, fields=changed))
    longer = dataclasses.replace(RULES, site_label_bytes_max=RULES.site_label_bytes_max + 1)
    assert "#define RULE_SITE_LABEL_BYTES_MAX 64\n" in rules.header(longer)
    assert rules.header_digest(longer) != rules.header_digest()
