"""The event rules, declared once: the fields an event has, their types, and every limit.

Three parsers check events: the exact one in :mod:`flowray.ingest.events`, its Arrow fast
paths in :mod:`flowray.ingest.fastparse` and the C parser in ``_native.c``. A rule
written into each of them separately drifts, and a fast path that takes what the exact
parser refuses stores bad data; so they all read :data:`RULES`, the C parser through the
header ``_rules.h`` that this module writes. tests/test_rules.py checks that the
committed header is this module's, and drives the three parsers at the edge of every
limit. After changing a rule::

    python -m flowray.ingest.rules --write   # regenerates flowray/ingest/_rules.h
    pip install -e .                         # rebuilds the C parser with it

This module imports nothing of flowray's, so the generator runs without the parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

HEADER_PATH = Path(__file__).with_name("_rules.h")


@dataclass(frozen=True)
class Field:
    """One field of an event and what its value must be.

    ``required``: an event without it (or with null) is refused. ``nullable``: its
    stored column may hold null; ts is neither, because a missing time is the time the
    server received the event.
    """

    name: str
    type: Literal["int64", "string"]
    required: bool = False
    nullable: bool = True
    chars_limit: str | None = None  # the EventRules limit on its length, by name
    empty_is_null: bool = False  # "" is stored as null: an empty id is no id
    numbers_as_text: bool = False  # an integer is taken as its decimal text


@dataclass(frozen=True)
class EventRules:
    """Every rule a batch of events is checked against. Each int here is a limit, and
    tests/test_rules.py finds them by that, so a new limit cannot go untested."""

    fields: tuple[Field, ...]  # in the order of the stored columns
    ts_min_ms: int  # the earliest valid time
    future_skew_ms: int  # how far ahead of the server clock a time may be (the default)
    batch_events_max: int  # the most events in one batch (the default)
    path_chars_max: int  # string lengths count characters (code points)
    visitor_chars_max: int
    site_bytes_max: int  # the longest site once normalized (ASCII, so bytes)
    site_label_bytes_max: int  # the longest label of a site, between its dots

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def chars_max(self, name: str) -> int:
        """The longest value of field ``name``, which must have a length limit."""
        limit = self.field(name).chars_limit
        if limit is None:
            raise KeyError(f"{name} has no length limit")
        return int(getattr(self, limit))

    @property
    def ts_min_text(self) -> str:
        """The earliest valid time in RFC 3339, as error messages name it."""
        moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=self.ts_min_ms)
        return moment.isoformat().replace("+00:00", "Z")

    def limits(self) -> dict[str, int]:
        """Every limit, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if type(getattr(self, f.name)) is int
        }


RULES = EventRules(
    fields=(
        Field("ts", "int64", nullable=False),
        Field("site", "string", required=True, nullable=False),
        Field("path", "string", chars_limit="path_chars_max"),
        Field("referrer", "string", chars_limit="path_chars_max"),
        Field("ua", "string", chars_limit="path_chars_max"),
        Field("visitor", "string", chars_limit="visitor_chars_max"),
        Field(
            "id",
            "string",
            chars_limit="visitor_chars_max",
            empty_is_null=True,
            numbers_as_text=True,
        ),
        # A custom event's name (Plausible's); null or "pageview" for a page view.
        Field("name", "string", chars_limit="visitor_chars_max"),
        # A custom event's properties, as the text of a JSON object: kept, not counted.
        Field("props", "string", chars_limit="path_chars_max"),
    ),
    ts_min_ms=946_684_800_000,  # 2000-01-01T00:00:00Z: earlier is a unit mix-up, not a log
    future_skew_ms=300_000,
    batch_events_max=200_000,
    path_chars_max=2048,  # path, referrer, ua and props: URLs, user agents, JSON
    visitor_chars_max=128,  # visitor, id and name: opaque tokens and event names
    # A DNS name: at most 253 characters in labels of at most 63. normalize_site in
    # flowray.core.router keeps its own copy; tests/test_rules.py checks that it agrees.
    site_bytes_max=253,
    site_label_bytes_max=63,
)


# --------------------------------------------------------------------------- the C header

_C_NAME = re.compile(r"[a-z][a-z0-9_]*")
# The length limits the C parser is called with, in the order of its arguments.
_C_CHARS_ARGS = ("path_chars_max", "visitor_chars_max")


def _check_c_shape(rules: EventRules) -> None:
    """Refuse rules the C parser cannot follow by a new header alone: it reads ts by
    hand (an int64 or a time string) and treats site as the one required field."""
    ts, *columns = rules.fields
    if (ts.name, ts.type, ts.required) != ("ts", "int64", False):
        raise ValueError("the C parser reads ts, an optional int64, as the first field")
    for f in columns:
        if f.type != "string" or not _C_NAME.fullmatch(f.name):
            raise ValueError(f"the C parser reads {f.name!r} as a string column named in C")
        if f.chars_limit not in (None, *_C_CHARS_ARGS):
            raise ValueError(f"the C parser is called with {' and '.join(_C_CHARS_ARGS)} only")
    if [f.name for f in rules.fields if f.required] != ["site"]:
        raise ValueError("the C parser knows one required field, site")
    if len(rules.fields) > 32:
        raise ValueError("the C parser marks the fields it has seen in 32 bits")


def _field_of(rules: EventRules) -> list[str]:
    """The C function that maps a key to its field: a switch on the key's length."""
    by_length: dict[int, list[str]] = {}
    for f in rules.fields:
        by_length.setdefault(len(f.name), []).append(f.name)
    lines = [
        "/* The field a key names, or -1 for a key the schema does not have. */",
        "static int field_of(const char *key, size_t n) {",
        "    switch (n) {",
    ]
    for length in sorted(by_length):
        lines.append(f"    case {length}:")
        for name in by_length[length]:
            target = "FIELD_TS" if name == "ts" else f"COL_{name.upper()}"
            lines.append(f'        if (!memcmp(key, "{name}", {length})) return {target};')
        lines.append("        return -1;")
    lines += ["    default:", "        return -1;", "    }", "}"]
    return lines


def _header_body(rules: EventRules) -> str:
    _check_c_shape(rules)
    columns = [f for f in rules.fields if f.name != "ts"]
    cols = [f"COL_{f.name.upper()}" for f in columns]
    empty = " || ".join(f"(c) == COL_{f.name.upper()}" for f in columns if f.empty_is_null)
    lines = [
        "/*",
        " * The event rules for flowray/ingest/_native.c, generated from",
        " * flowray/ingest/rules.py by `python -m flowray.ingest.rules --write`: do not edit.",
        " * tests/test_rules.py fails when this file is not what the rules generate.",
        " */",
        "#ifndef FLOWRAY_INGEST_RULES_H",
        "#define FLOWRAY_INGEST_RULES_H",
        "",
        "/* The string columns, in the order of EVENT_SCHEMA after ts. */",
        f"enum {{ {', '.join(cols)}, NCOLS }};",
        "enum { FIELD_TS = NCOLS, NFIELDS };",
        "",
        "/* The longest value of each column in characters, from the limits the parser is",
        " * called with; PY_SSIZE_T_MAX where there is none (the site's rules are below). */",
        f"#define RULE_CHARS_MAX({', '.join(_C_CHARS_ARGS)}) {{ \\",
        *(f"    {f.chars_limit or 'PY_SSIZE_T_MAX'}, /* {f.name} */ \\" for f in columns),
        "}",
        "",
        '/* Whether "" in column c is stored as null. */',
        f"#define RULE_EMPTY_IS_NULL(c) ({empty or '0'})",
        "",
        "/* A normalized site: at most this many bytes, in labels of at most this many. */",
        f"#define RULE_SITE_BYTES_MAX {rules.site_bytes_max}",
        f"#define RULE_SITE_LABEL_BYTES_MAX {rules.site_label_bytes_max}",
        "",
        *_field_of(rules),
    ]
    return "\n".join(lines) + "\n"


def header_digest(rules: EventRules = RULES) -> str:
    """A digest of the rules the C parser is built with; the built module holds it as
    ``RULES_DIGEST``, so a parser built from other rules is noticed at import."""
    return hashlib.sha256(_header_body(rules).encode()).hexdigest()[:16]


def header(rules: EventRules = RULES) -> str:
    """The text of ``_rules.h`` for ``rules``."""
    digest = f'/* See header_digest in rules.py. */\n#define RULES_DIGEST "{header_digest(rules)}"'
    return f"{_header_body(rules)}\n{digest}\n\n#endif\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowray.ingest.rules", description="Write the C parser's rules header."
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--header", action="store_true", help="print _rules.h")
    group.add_argument("--write", action="store_true", help=f"write {HEADER_PATH}")
    args = parser.parse_args(argv)
    if args.header:
        sys.stdout.write(header())
    else:
        HEADER_PATH.write_text(header())
        print(f"wrote {HEADER_PATH}; rebuild the C parser: pip install -e .")
    return 0


if __name__ == "__main__":
    sys.exit(main())
