"""Named processing logic: which raw events count as traffic.

A logic is a function from a table of raw events (see ``flowray.events.EVENT_SCHEMA``)
to the table of events that count. It has a name so that a warehouse version records
which logic produced it, and history can be re-processed with another one.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

Logic = Callable[[pa.Table], pa.Table]
_LOGICS: dict[str, Logic] = {}


def register(name: str) -> Callable[[Logic], Logic]:
    """Decorator: make ``fn`` available as processing logic ``name``."""

    def wrap(fn: Logic) -> Logic:
        if name in _LOGICS and _LOGICS[name] is not fn:
            raise ValueError(f"processing logic {name!r} is already registered")
        _LOGICS[name] = fn
        return fn

    return wrap


def get(name: str) -> Logic:
    try:
        return _LOGICS[name]
    except KeyError:
        known = ", ".join(sorted(_LOGICS))
        raise ValueError(f"unknown processing logic {name!r} (known: {known})") from None


def names() -> list[str]:
    return sorted(_LOGICS)


@register("default")
def count_every_event(events: pa.Table) -> pa.Table:
    """Every accepted page view counts."""
    return events
