"""Settings for a flowray cluster, with defaults that suit one machine.

Every limit lives here with its unit in its name, so an operator can find and change
it in one place. ``Settings.from_env`` reads ``FLOWRAY_*`` variables, which is how the
CLI, the Ray actors and the tests configure the same code. Each field is typed, with its
range or choices, and carries a one-line description; ``settings_table`` renders them
all for README.md. A value out of range is refused when the settings are made, with a
message that names its ``FLOWRAY_*`` variable and what it may be.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from flowray.core.router import ShardMap

if TYPE_CHECKING:
    from pydantic.json_schema import JsonDict

DEFAULT_DATA_DIR = "./flowray-data"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ENV_PREFIX = "FLOWRAY_"
# auto: tokens are required once FLOWRAY_ADMIN_TOKEN is set or a token exists.
AuthMode = Literal["auto", "on", "off"]
AUTH_MODES: tuple[str, ...] = get_args(AuthMode)
GATEWAYS_MAX = 64
PORT_MAX = 65535
# What redis.asyncio.from_url understands.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# How long ``flowray up --wait-nodes N`` waits for the nodes to join.
NODES_TIMEOUT_S = 600.0

# The kinds of value, each with its range. Floats refuse NaN and infinity: neither is
# a usable duration, and every comparison with a NaN is false, so none would fire.
Count = Annotated[int, Field(ge=1)]
CountOrZero = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(ge=1, le=PORT_MAX)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
SecondsOrZero = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1)]


class SettingsError(ValueError):
    """Settings that break a rule; the message names each ``FLOWRAY_*`` variable at fault
    and what it may be (a ValueError, as the callers of ``validate`` expect)."""


def _docs(allowed: str | None = None, shown: str | None = None) -> JsonDict:
    """A field's extras for ``settings_table``: what it may be, when its type cannot say
    (a rule checked by a validator), and its default in markdown, when computed."""
    extra: JsonDict = {"allowed": allowed, "shown": shown}
    return {k: v for k, v in extra.items() if v is not None}


class Settings(BaseSettings):
    """Every setting, its default, its range and its one-line description."""

    # Plain construction takes only its arguments (the tests, ``from_json``); the
    # environment is read by ``from_env`` alone (see ``settings_customise_sources``).
    # Other FLOWRAY_* variables (FLOWRAY_TOKEN, FLOWRAY_URL, ...) are not settings and
    # are ignored; an unknown keyword argument is refused.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    data_dir: Path = Field(
        Path(DEFAULT_DATA_DIR),
        description="The cluster's directory: replica logs, warehouse, tokens, logs.",
        json_schema_extra=_docs(shown=f"`{DEFAULT_DATA_DIR}`"),
    )
    host: Name = Field(
        "127.0.0.1", description="Address the API and the ingest gateways listen on."
    )
    # One namespace per cluster sharing a Ray instance.
    namespace: Name = Field("flowray", description="Ray namespace of the cluster's named actors.")
    port: Port = Field(8000, description="HTTP port of the whole API (Ray Serve).")
    # The ingest gateway is plain uvicorn, micro-batching writes.
    ingest_port: Annotated[int, Field(ge=0, le=PORT_MAX)] = Field(
        8001, description="HTTP port of the ingest gateways; 0 turns them off."
    )
    # Gateway processes sharing that port (SO_REUSEPORT: the kernel spreads the
    # connections): parsing runs on as many cores, and a rolling restart replaces one
    # while the others serve.
    gateways: Annotated[int, Field(ge=1, le=GATEWAYS_MAX)] = Field(
        2, description="Ingest gateway processes sharing the ingest port."
    )
    groups: Count = Field(2, description="Shard groups.")
    replicas: Count = Field(
        3,
        description="Replicas per group (an odd number).",
        json_schema_extra=_docs(allowed="an odd integer >= 1"),
    )
    shards: Count = Field(
        8,
        description="Shards, spread over the groups; fixed once data exists.",
        json_schema_extra=_docs(allowed="an integer >= groups"),
    )
    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Redis of the query cache; empty, or none answering: an in-process cache.",
        json_schema_extra=_docs(allowed=f"empty, or a {', '.join(REDIS_SCHEMES)} URL"),
    )
    redis_timeout_s: Seconds = Field(
        0.05, description="A Redis call slower than this is a cache miss."
    )
    # At least 1: Redis refuses an expiry of 0.
    cache_ttl_s: Count = Field(3600, description="Life of a cached final answer.")
    query_timeout_s: Seconds = Field(
        10.0, description="A query running longer is answered with an error."
    )
    # So fresh traffic shows within seconds.
    live_cache_ttl_s: Count = Field(
        1, description="Life of a cached answer with provisional (live) points."
    )
    # The grace lets stragglers from clients with late clocks still land in the first pass.
    seal_grace_s: SecondsOrZero = Field(
        300.0,
        description="A block is sealed once its hour plus this grace is over, and it is idle "
        "or old.",
    )
    # Most useful for a block of an hour long past (backfill, late events).
    seal_idle_s: SecondsOrZero = Field(
        10.0, description="Idle: no event has reached the block for this long."
    )
    seal_open_max_s: SecondsOrZero = Field(
        120.0, description="Old: the block has been open this long."
    )
    block_bytes_max: Count = Field(
        256 * 1024 * 1024, description="A block this large is sealed (256 MiB)."
    )
    process_interval_s: Seconds = Field(
        5.0, description="How often the processor seals and processes what is due."
    )
    reduce_keys: Count = Field(4, description="Reduce tasks (keys) per processing job.")
    map_slice_bytes: Count = Field(
        32 * 1024 * 1024, description="Raw log bytes read by one map task (32 MiB)."
    )
    # Ingest limits.
    body_bytes_max: Count = Field(
        32 * 1024 * 1024, description="Largest ingest request body (32 MiB)."
    )
    batch_events_max: Count = Field(200_000, description="Most events in one ingest request.")
    future_skew_s: SecondsOrZero = Field(
        300.0, description="How far ahead of the server clock an event may be."
    )
    commit_timeout_s: Seconds = Field(
        10.0, description="A write not committed within this is answered 503."
    )
    # Replication timing: a master sends heartbeats every heartbeat_ticks; a follower
    # that hears nothing for election_ticks..2*election_ticks stands for election.
    tick_s: Seconds = Field(0.05, description="One replication tick.")
    election_ticks: Count = Field(
        10, description="Ticks of silence (up to twice this) before an election."
    )
    heartbeat_ticks: Count = Field(
        2,
        description="Ticks between a master's heartbeats.",
        json_schema_extra=_docs(allowed="an integer >= 1, below election_ticks"),
    )
    rpc_timeout_s: Seconds = Field(5.0, description="Timeout of calls between actors.")
    # How long the ingress waits for a group's master to commit a proposal before it
    # asks the master's followers whether they still follow it; once they do not
    # (paused, partitioned, its disk hung) it finds the new master and resends the
    # proposal when every event in it has an id (otherwise it answers 503: the write
    # may still commit). The shortest election timeout: no new master can exist
    # sooner. Proposals of many bytes get longer (see ingest).
    propose_deadline_s: Seconds = Field(
        0.5,
        description=(
            "A master that has not committed a proposal by then is given up once its"
            " followers no longer follow it."
        ),
        json_schema_extra=_docs(allowed="a number > 0, below commit_timeout_s"),
    )
    # Replicas honour fault files in their directories (tests of hung disks only).
    fault_injection: bool = Field(
        False, description="true (or 1): replicas honour fault files (tests only)."
    )
    process_timeout_s: Seconds = Field(
        600.0, description="Longest wait for a processing job's tasks."
    )
    query_threads: Count = Field(
        2, description="DuckDB threads a query may use in each API process."
    )
    # Query limits: the longest range per interval, in days.
    query_minute_days_max: Count = Field(
        31, description="Longest query range at minute resolution, in days."
    )
    query_hour_days_max: Count = Field(
        3 * 366, description="Longest query range at hour resolution, in days."
    )
    query_day_days_max: Count = Field(
        50 * 366, description="Longest query range at day resolution, in days."
    )
    num_cpus: Count = Field(
        default_factory=lambda: os.cpu_count() or 2,
        description="CPUs of a local Ray; map tasks in flight: two per CPU.",
        json_schema_extra=_docs(shown="the CPU count"),
    )
    # See flowray/api/auth.py. The admin token itself is read from FLOWRAY_ADMIN_TOKEN
    # by each API process and is deliberately not a setting: settings travel in Ray
    # runtime environments.
    auth: AuthMode = Field(
        "auto", description="When the API demands bearer tokens: auto, on or off."
    )
    # Comma separated, and importable on every node (installed, or on PYTHONPATH).
    logic_modules: str = Field(
        "",
        description="Modules the processor and its tasks import first: they register logics.",
        json_schema_extra=_docs(allowed="comma-separated module names, or empty"),
    )
    # On a multi-node cluster it must be storage every node mounts at the same path.
    warehouse: str = Field(
        "",
        description="Directory of the Parquet warehouse; empty: DATA_DIR/warehouse.",
        json_schema_extra=_docs(allowed="a path, or empty"),
    )
    # The web tracker's endpoint (POST /api/event), see flowray/api/tracker.py.
    trusted_proxies: str = Field(
        "",
        description="Proxies whose X-Forwarded-For /api/event believes; others: the peer.",
        json_schema_extra=_docs(allowed="comma-separated IP addresses or CIDR networks"),
    )
    event_rate_per_ip: Seconds = Field(
        20.0, description="Tracker events per second one client address may send (per front)."
    )
    event_rate_per_site: Seconds = Field(
        5000.0, description="Tracker events per second one site may receive (per front)."
    )
    sites_reload_s: Seconds = Field(
        2.0, description="How stale a front's copy of the registered sites may be."
    )
    # Raw events a master keeps for live visitors and breakdowns, see flowray/query/live.py.
    live_facts_bytes_max: Count = Field(
        256 * 1024 * 1024,
        description="Memory a master keeps for live visitors and breakdowns, in bytes.",
    )
    # A cluster's workers join after the head starts flowray.
    wait_nodes: CountOrZero = Field(
        0, description="Ray nodes to wait for before placing replicas; 0: none."
    )
    # Set from the data directory's layout; groups added later start without shards.
    base_groups: CountOrZero = Field(
        0, description="Groups the shards were first spread over; 0: as many as groups."
    )

    if not TYPE_CHECKING:  # mypy keeps the typed keyword signature pydantic declares

        def __init__(self, **values: Any) -> None:
            unknown = sorted(set(values) - set(type(self).model_fields))
            if unknown:  # a TypeError, as for any call with a wrong keyword
                raise TypeError(f"unknown settings: {', '.join(unknown)}")
            try:
                super().__init__(**values)
            except ValidationError as exc:
                raise SettingsError(_explain(exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the arguments: settings that arrive as JSON (an actor's) or as test
        values must not pick up whatever FLOWRAY_* the process happens to have."""
        return (init_settings,)

    @field_validator("replicas")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(
                f"must be an odd number (1, 3, 5, ...), got {value}: "
                "with an even count a split vote can leave no majority"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(REDIS_SCHEMES):
            raise ValueError(
                f"must be empty or start with {', '.join(REDIS_SCHEMES)}, got {value!r}"
            )
        return value

    @field_validator("logic_modules")
    @classmethod
    def _module_names(cls, value: str) -> str:
        bad = [
            name
            for name in (m.strip() for m in value.split(","))
            if name and not all(part.isidentifier() for part in name.split("."))
        ]
        if bad:
            raise ValueError(f"must be comma-separated module names, got {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _together(self) -> Settings:
        """The rules between fields (each field's own range is checked before)."""
        if self.shards < self.groups:
            raise ValueError(
                f"shards ({_variable('shards')}, {self.shards}) must be at least groups "
                f"({_variable('groups')}, {self.groups})"
            )
        if self.heartbeat_ticks >= self.election_ticks:
            raise ValueError(
                f"heartbeat_ticks ({_variable('heartbeat_ticks')}, {self.heartbeat_ticks}) "
                f"must be below election_ticks ({_variable('election_ticks')}, "
                f"{self.election_ticks}): followers would stand for election between beats"
            )
        if not self.propose_deadline_s < self.commit_timeout_s:
            raise ValueError(
                f"propose_deadline_s ({_variable('propose_deadline_s')}) must be below "
                f"commit_timeout_s ({_variable('commit_timeout_s')}, {self.commit_timeout_s}), "
                f"got {self.propose_deadline_s}"
            )
        return self

    def validate(self) -> Settings:  # type: ignore[override]  # BaseModel's is deprecated
        """``self``: settings are checked when they are made, so any that exist are
        valid. Kept so that callers can say where they rely on it."""
        return self

    @property
    def cluster_file(self) -> Path:
        return self.data_dir / "cluster.json"

    @property
    def layout_file(self) -> Path:
        return self.data_dir / "layout.json"

    @property
    def tokens_file(self) -> Path:
        return self.data_dir / "tokens.sqlite"

    @property
    def warehouse_dir(self) -> Path:
        return Path(self.warehouse) if self.warehouse else self.data_dir / "warehouse"

    def base_map(self) -> ShardMap:
        """The shard map before any move: shard s in group s mod base_groups."""
        return ShardMap.round_robin(self.shards, self.base_groups or self.groups)

    @property
    def logic_module_names(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.logic_modules.split(",") if m.strip())

    def replica_dir(self, group: int, replica: int) -> Path:
        return self.data_dir / "groups" / f"g{group:03d}" / f"r{replica}"

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``, checked as any new settings are."""
        return type(self)(**(dict(self) | changes))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (the data directory as a string): how settings travel to
        the Ray actors."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        """Unknown keys are ignored: a blob from a newer or older flowray still loads."""
        return cls(**{k: v for k, v in data.items() if k in cls.model_fields})

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Defaults, then ``FLOWRAY_<FIELD>`` variables, then the overrides that are not
        None (the CLI passes None for an option not given)."""
        values = EnvSettingsSource(cls)()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _variable(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def _explain(exc: ValidationError) -> str:
    """Every broken rule, on one line, each naming its variable and what it may be."""
    lines = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "value_error":  # a validator's own words
            reason = str(error["ctx"]["error"])
            lines.append(f"{name} ({_variable(name)}) {reason}" if name else reason)
        elif name in Settings.model_fields:
            lines.append(
                f"{name} ({_variable(name)}) must be {allowed_values(name)}, got {error['input']!r}"
            )
        else:
            lines.append(f"{name or 'settings'}: {error['msg']}")
    return "; ".join(lines)


def allowed_values(name: str) -> str:
    """What a setting may be, in words, from its type and range (or its rule's words)."""
    info = Settings.model_fields[name]
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "allowed" in extra:
        return str(extra["allowed"])
    kind = info.annotation
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(kind))
    if kind is bool:
        return "true or false (or 1 or 0)"
    if kind is Path:
        return "a path"
    if kind is str:
        bounded = any(getattr(m, "min_length", None) for m in info.metadata)
        return "non-empty text" if bounded else "text"
    noun = "an integer" if kind is int else "a number"
    bounds = {
        key: getattr(m, key)
        for m in info.metadata
        for key in ("ge", "gt", "le")
        if getattr(m, key, None) is not None
    }
    if "ge" in bounds and "le" in bounds:
        return f"{noun} {bounds['ge']}..{bounds['le']}"
    if "ge" in bounds:
        return f"{noun} >= {bounds['ge']}"
    if "gt" in bounds:
        return f"{noun} > {bounds['gt']}"
    return noun


def settings_table() -> str:
    """The markdown table of every setting: its variable, default, values and description.

    README.md holds its output between ``<!-- settings:begin -->`` and
    ``<!-- settings:end -->`` (tests/test_docs.py checks that it is current).
    """
    rows = ["| variable | default | values | what it sets |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        doc = str(info.description or "").replace("|", "\\|")
        values = allowed_values(name).replace("|", "\\|")
        rows.append(f"| `{_variable(name)}` | {_shown_default(name)} | {values} | {doc} |")
    return "\n".join(rows) + "\n"


def _shown_default(name: str) -> str:
    """A field's default as the table shows it: as its variable would spell it."""
    info = Settings.model_fields[name]
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "shown" in extra:
        return str(extra["shown"])
    value = info.get_default(call_default_factory=False)
    if isinstance(value, bool):
        shown = str(value).lower()
    else:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"`{shown}`" if shown else "(empty)"
