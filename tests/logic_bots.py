"""Processing logics a user might write, registered from a module of their own.

The reprocessing tests name this module in ``--logic-module`` (and the processor and
its map tasks import it), as a user would name theirs.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from flowray.core.logic import register

BOT_PATTERN = "(?i)bot|spider|crawl"
SLOW_LOGIC_DELAY_S = 3.0


@register("no-bots")
def exclude_bots(events: pa.Table) -> pa.Table:
    """Page views whose user agent names a bot do not count."""
    ua = pc.fill_null(events.column("ua"), "")
    return events.filter(pc.invert(pc.match_substring_regex(ua, BOT_PATTERN)))


@register("slow-no-bots")
def exclude_bots_slowly(events: pa.Table) -> pa.Table:
    """no-bots, slowly: gives a test time to kill the processor in the middle of a job."""
    time.sleep(SLOW_LOGIC_DELAY_S)
    return exclude_bots(events)
