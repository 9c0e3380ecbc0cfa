"""Units of time in milliseconds, the unit of every event time in flowray."""

from __future__ import annotations

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
DAY_HOURS = 24
