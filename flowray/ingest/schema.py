"""The event schema and its limits, and the Limits a batch is parsed under: shared by the
parsers (flowray.ingest.events and its fast paths in flowray.ingest.fastparse) without
either importing the other.

All of it is derived from :data:`flowray.ingest.rules.RULES`, where the rules are
declared; the names here are what the rest of flowray imports."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from flowray.ingest.rules import RULES

_ARROW_TYPES = {"int64": pa.int64(), "string": pa.string()}

EVENT_SCHEMA: pa.Schema = pa.schema(
    [pa.field(f.name, _ARROW_TYPES[f.type], nullable=f.nullable) for f in RULES.fields]
)

TS_MIN_MS: int = RULES.ts_min_ms  # 2000-01-01T00:00:00Z
PATH_CHARS_MAX: int = RULES.path_chars_max  # path, referrer and ua
VISITOR_CHARS_MAX: int = RULES.visitor_chars_max  # visitor and id


@dataclass
class Routing:
    """Asks the C parser for a request's rows in routing order (that of
    :func:`flowray.ingest.pieces.route_table` for a shard map), which spares the ingress a
    second pass over the sites and a take of every column. The parser sets ``table``
    and ``runs`` (rank, hour, first row, rows) when it gave its rows so: when every
    site was in its normal form and its shard was known."""

    shard_count: int
    ranks: bytes  # each shard's rank, int64
    hour_ms: int
    table: pa.Table | None = None
    runs: list[tuple[int, int, int, int]] | None = None


@dataclass(frozen=True)
class Limits:
    """What a batch may contain, with the server clock passed in rather than read."""

    now_ms: int
    future_skew_ms: int = RULES.future_skew_ms
    batch_events_max: int = RULES.batch_events_max
    routing: Routing | None = None  # see Routing: the same rows, maybe in another order

    @property
    def ts_max_ms(self) -> int:
        """The latest valid timestamp: a little ahead of the server, for client clock skew."""
        return self.now_ms + self.future_skew_ms
