"""The event schema and its limits: shared by the parsers (flowray.ingest.events and its fast
paths in flowray.ingest.fastparse) without either importing the other."""

from __future__ import annotations

import pyarrow as pa

EVENT_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("referrer", pa.string()),
        pa.field("ua", pa.string()),
        pa.field("visitor", pa.string()),
        pa.field("id", pa.string()),
    ]
)

TS_MIN_MS: int = 946_684_800_000  # 2000-01-01T00:00:00Z
PATH_CHARS_MAX = 2048  # path, referrer and ua
VISITOR_CHARS_MAX = 128  # visitor and id
