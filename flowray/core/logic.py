"""Named processing logic: which raw events count as traffic.

A logic is a function from a table of raw events (see ``flowray.ingest.events.EVENT_SCHEMA``)
to the table of events that count. It has a name so that a warehouse version records
which logic produced it, and history can be re-processed with another one.

A user writes logic in a module of their own and registers it::

    import pyarrow.compute as pc
    from flowray.core.logic import register

    @register("no-bots")
    def exclude_bots(events):
        ua = pc.fill_null(events["ua"], "")
        return events.filter(pc.invert(pc.match_substring_regex(ua, "(?i)bot|spider")))

The module is named in ``FLOWRAY_LOGIC_MODULES`` (or ``flowray reprocess
--logic-module``) so that the processor and its tasks import it before processing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

import pyarrow as pa

Logic = Callable[[pa.Table], pa.Table]
_LOGICS: dict[str, Logic] = {}


def register(name: str) -> Callable[[Logic], Logic]:
    """Decorator: make ``fn`` available as processing logic ``name``."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"a logic name is letters, digits, '-' and '_', got {name!r}")

    def wrap(fn: Logic) -> Logic:
        known = _LOGICS.get(name)
        # Re-importing a module (a reload) registers a new function object of the same
        # qualified name: that is the same logic, not a clash.
        if known is not None and _qualname(known) != _qualname(fn):
            raise ValueError(f"processing logic {name!r} is already registered")
        _LOGICS[name] = fn
        return fn

    return wrap


def _qualname(fn: Logic) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def load(modules: Iterable[str]) -> None:
    """Import the modules that register logics (each once per process)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(
                f"cannot import logic module {module!r}: {exc} "
                "(it must be importable where flowray runs: installed, or on PYTHONPATH)"
            ) from exc


def get(name: str, modules: Iterable[str] = ()) -> Logic:
    load(modules)
    try:
        return _LOGICS[name]
    except KeyError:
        known = ", ".join(sorted(_LOGICS))
        raise ValueError(f"unknown processing logic {name!r} (known: {known})") from None


def apply(name: str, events: pa.Table, modules: Iterable[str] = ()) -> pa.Table:
    """Run logic ``name`` and check that it kept the event schema and only removed rows."""
    out = get(name, modules)(events)
    if not isinstance(out, pa.Table):
        raise TypeError(f"processing logic {name!r} returned {type(out).__name__}, not a Table")
    if out.num_rows > events.num_rows:
        raise ValueError(f"processing logic {name!r} added rows: a logic only selects events")
    if not {"ts", "site", "id"} <= set(out.column_names):
        raise ValueError(f"processing logic {name!r} dropped a needed column (ts, site or id)")
    return out


def names() -> list[str]:
    return sorted(_LOGICS)


@register("default")
def count_every_event(events: pa.Table) -> pa.Table:
    """Every accepted page view counts."""
    return events
