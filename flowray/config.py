"""Settings for a flowray cluster, with defaults that suit one machine.

Every limit lives here with its unit in its name, so an operator can find and change
it in one place. ``Settings.from_env`` reads ``FLOWRAY_*`` variables, which is how the
CLI, the Ray actors and the tests configure the same code. Each field carries a one-line
description in its metadata; ``settings_table`` renders them all for README.md.
"""

from __future__ import annotations

import os
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from flowray.core.router import ShardMap

DEFAULT_DATA_DIR = "./flowray-data"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# auto: tokens are required once FLOWRAY_ADMIN_TOKEN is set or a token exists.
AUTH_MODES = ("auto", "on", "off")
GATEWAYS_MAX = 64
# How long ``flowray up --wait-nodes N`` waits for the nodes to join.
NODES_TIMEOUT_S = 600.0


def _doc(text: str, shown: str | None = None) -> dict[str, str]:
    """A field's metadata: its one-line description, and its default in markdown if computed."""
    return {"doc": text} if shown is None else {"doc": text, "default": shown}


@dataclass(frozen=True)
class Settings:
    """Every setting, its default and its one-line description (``settings_table``)."""

    data_dir: Path = field(
        default_factory=lambda: Path(DEFAULT_DATA_DIR),
        metadata=_doc(
            "The cluster's directory: replica logs, warehouse, tokens, logs.",
            f"`{DEFAULT_DATA_DIR}`",
        ),
    )
    host: str = field(
        default="127.0.0.1", metadata=_doc("Address the API and the ingest gateways listen on.")
    )
    # One namespace per cluster sharing a Ray instance.
    namespace: str = field(
        default="flowray", metadata=_doc("Ray namespace of the cluster's named actors.")
    )
    port: int = field(default=8000, metadata=_doc("HTTP port of the whole API (Ray Serve)."))
    # The ingest gateway is plain uvicorn, micro-batching writes.
    ingest_port: int = field(
        default=8001, metadata=_doc("HTTP port of the ingest gateways; 0 turns them off.")
    )
    # Gateway processes sharing that port (SO_REUSEPORT: the kernel spreads the
    # connections): parsing runs on as many cores, and a rolling restart replaces one
    # while the others serve.
    gateways: int = field(
        default=2, metadata=_doc("Ingest gateway processes sharing the ingest port.")
    )
    groups: int = field(default=2, metadata=_doc("Shard groups."))
    replicas: int = field(default=3, metadata=_doc("Replicas per group (an odd number)."))
    shards: int = field(
        default=8, metadata=_doc("Shards, spread over the groups; fixed once data exists.")
    )
    redis_url: str = field(
        default=DEFAULT_REDIS_URL,
        metadata=_doc("Redis of the query cache; empty, or none answering: an in-process cache."),
    )
    redis_timeout_s: float = field(
        default=0.05, metadata=_doc("A Redis call slower than this is a cache miss.")
    )
    cache_ttl_s: int = field(default=3600, metadata=_doc("Life of a cached final answer."))
    query_timeout_s: float = field(
        default=10.0, metadata=_doc("A query running longer is answered with an error.")
    )
    # So fresh traffic shows within seconds.
    live_cache_ttl_s: int = field(
        default=1, metadata=_doc("Life of a cached answer with provisional (live) points.")
    )
    # The grace lets stragglers from clients with late clocks still land in the first pass.
    seal_grace_s: float = field(
        default=300.0,
        metadata=_doc(
            "A block is sealed once its hour plus this grace is over, and it is idle or old."
        ),
    )
    # Most useful for a block of an hour long past (backfill, late events).
    seal_idle_s: float = field(
        default=10.0, metadata=_doc("Idle: no event has reached the block for this long.")
    )
    seal_open_max_s: float = field(
        default=120.0, metadata=_doc("Old: the block has been open this long.")
    )
    block_bytes_max: int = field(
        default=256 * 1024 * 1024, metadata=_doc("A block this large is sealed (256 MiB).")
    )
    process_interval_s: float = field(
        default=5.0, metadata=_doc("How often the processor seals and processes what is due.")
    )
    reduce_keys: int = field(default=4, metadata=_doc("Reduce tasks (keys) per processing job."))
    map_slice_bytes: int = field(
        default=32 * 1024 * 1024, metadata=_doc("Raw log bytes read by one map task (32 MiB).")
    )
    # Ingest limits.
    body_bytes_max: int = field(
        default=32 * 1024 * 1024, metadata=_doc("Largest ingest request body (32 MiB).")
    )
    batch_events_max: int = field(
        default=200_000, metadata=_doc("Most events in one ingest request.")
    )
    future_skew_s: float = field(
        default=300.0, metadata=_doc("How far ahead of the server clock an event may be.")
    )
    commit_timeout_s: float = field(
        default=10.0, metadata=_doc("A write not committed within this is answered 503.")
    )
    # Replication timing: a master sends heartbeats every heartbeat_ticks; a follower
    # that hears nothing for election_ticks..2*election_ticks stands for election.
    tick_s: float = field(default=0.05, metadata=_doc("One replication tick."))
    election_ticks: int = field(
        default=10, metadata=_doc("Ticks of silence (up to twice this) before an election.")
    )
    heartbeat_ticks: int = field(default=2, metadata=_doc("Ticks between a master's heartbeats."))
    rpc_timeout_s: float = field(default=5.0, metadata=_doc("Timeout of calls between actors."))
    # How long the ingress waits for a group's master to commit a proposal before it
    # gives that master up (paused, partitioned, its disk hung), finds the new one and
    # resends the proposal when every event in it has an id (otherwise it answers 503:
    # the write may still commit). Proposals of many bytes get longer (see ingest).
    propose_deadline_s: float = field(
        default=1.0,
        metadata=_doc("A master that has not committed a proposal by then is given up."),
    )
    # 1: replicas honour fault files in their directories (tests of hung disks only).
    fault_injection: int = field(
        default=0, metadata=_doc("1: replicas honour fault files (tests only).")
    )
    process_timeout_s: float = field(
        default=600.0, metadata=_doc("Longest wait for a processing job's tasks.")
    )
    # Query limits: the longest range per interval, in days.
    query_minute_days_max: int = field(
        default=31, metadata=_doc("Longest query range at minute resolution, in days.")
    )
    query_hour_days_max: int = field(
        default=3 * 366, metadata=_doc("Longest query range at hour resolution, in days.")
    )
    query_day_days_max: int = field(
        default=50 * 366, metadata=_doc("Longest query range at day resolution, in days.")
    )
    num_cpus: int = field(
        default_factory=lambda: os.cpu_count() or 2,
        metadata=_doc("CPUs of a local Ray; map tasks in flight: two per CPU.", "the CPU count"),
    )
    # See flowray/api/auth.py. The admin token itself is read from FLOWRAY_ADMIN_TOKEN
    # by each API process and is deliberately not a setting: settings travel in Ray
    # runtime environments.
    auth: str = field(
        default="auto", metadata=_doc("When the API demands bearer tokens: auto, on or off.")
    )
    # Comma separated, and importable on every node (installed, or on PYTHONPATH).
    logic_modules: str = field(
        default="",
        metadata=_doc("Modules the processor and its tasks import first: they register logics."),
    )
    # On a multi-node cluster it must be storage every node mounts at the same path.
    warehouse: str = field(
        default="", metadata=_doc("Directory of the Parquet warehouse; empty: DATA_DIR/warehouse.")
    )
    # A cluster's workers join after the head starts flowray.
    wait_nodes: int = field(
        default=0, metadata=_doc("Ray nodes to wait for before placing replicas; 0: none.")
    )
    # Set from the data directory's layout; groups added later start without shards.
    base_groups: int = field(
        default=0, metadata=_doc("Groups the shards were first spread over; 0: as many as groups.")
    )

    def validate(self) -> Settings:
        if self.replicas < 1 or self.replicas % 2 == 0:
            raise ValueError(
                f"replicas must be an odd number (1, 3, 5, ...), got {self.replicas}: "
                "with an even count a split vote can leave no majority"
            )
        if self.groups < 1:
            raise ValueError(f"groups must be at least 1, got {self.groups}")
        if self.shards < self.groups:
            raise ValueError(f"shards ({self.shards}) must be at least groups ({self.groups})")
        if not 1 <= self.gateways <= GATEWAYS_MAX:
            raise ValueError(f"gateways must be 1..{GATEWAYS_MAX}, got {self.gateways}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.batch_events_max < 1:
            raise ValueError(f"batch_events_max must be at least 1, got {self.batch_events_max}")
        if not self.future_skew_s >= 0:  # also refuses NaN
            raise ValueError(f"future_skew_s must be 0 or more, got {self.future_skew_s}")
        if not 0 < self.propose_deadline_s < self.commit_timeout_s:
            raise ValueError(
                f"propose_deadline_s must be above 0 and below commit_timeout_s "
                f"({self.commit_timeout_s}), got {self.propose_deadline_s}"
            )
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
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

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["data_dir"] = str(self.data_dir)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        return cls(**values)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Defaults, then ``FLOWRAY_<FIELD>`` variables, then explicit overrides."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"FLOWRAY_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _coerce(f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        return cls(**values)


def settings_table() -> str:
    """The markdown table of every setting: its variable, default and description.

    README.md holds its output between ``<!-- settings:begin -->`` and
    ``<!-- settings:end -->`` (tests/test_docs.py checks that it is current).
    """
    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    for f in fields(Settings):
        doc = str(f.metadata.get("doc", "")).replace("|", "\\|")
        rows.append(f"| `FLOWRAY_{f.name.upper()}` | {_shown_default(f)} | {doc} |")
    return "\n".join(rows) + "\n"


def _shown_default(f: Field[Any]) -> str:
    """A field's default as the table shows it: as its variable would spell it."""
    if "default" in f.metadata:
        return str(f.metadata["default"])
    value = f.default
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"`{shown}`" if shown else "(empty)"


def _coerce(type_name: object, raw: str) -> Any:
    name = str(type_name)
    if name == "int":
        return int(raw)
    if name == "float":
        return float(raw)
    if name == "Path":
        return Path(raw)
    return raw
