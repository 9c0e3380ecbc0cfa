"""Settings for a flowray cluster, with defaults that suit one machine.

Every limit lives here with its unit in its name, so an operator can find and change
it in one place. ``Settings.from_env`` reads ``FLOWRAY_*`` variables, which is how the
CLI, the Ray actors and the tests configure the same code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
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


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR))
    host: str = "127.0.0.1"
    # Ray namespace of the cluster's named actors; one per cluster sharing a Ray instance.
    namespace: str = "flowray"
    port: int = 8000
    # The ingest gateway (plain uvicorn, micro-batching); 0 turns it off.
    ingest_port: int = 8001
    # Gateway processes sharing that port (SO_REUSEPORT: the kernel spreads the
    # connections): parsing runs on as many cores, and a rolling restart replaces one
    # while the others serve.
    gateways: int = 2
    groups: int = 2
    replicas: int = 3
    shards: int = 8
    # Empty string: no Redis, use the in-process cache.
    redis_url: str = DEFAULT_REDIS_URL
    redis_timeout_s: float = 0.05
    cache_ttl_s: int = 3600
    query_timeout_s: float = 10.0
    # Answers with provisional (live) points are cached this long, so fresh traffic
    # shows within seconds.
    live_cache_ttl_s: int = 1
    # A block (shard, hour) is sealed once its hour has ended plus this grace period,
    # so stragglers from clients with late clocks still land in the first pass.
    seal_grace_s: float = 300.0
    # A block of an hour long past (backfill, late events) is sealed once no event has
    # arrived for this long, or once it has been open this long.
    seal_idle_s: float = 10.0
    seal_open_max_s: float = 120.0
    block_bytes_max: int = 256 * 1024 * 1024
    process_interval_s: float = 5.0
    reduce_keys: int = 4
    map_slice_bytes: int = 32 * 1024 * 1024
    # Ingest limits.
    body_bytes_max: int = 32 * 1024 * 1024
    batch_events_max: int = 200_000
    future_skew_s: float = 300.0
    commit_timeout_s: float = 10.0
    # Replication timing: a master sends heartbeats every heartbeat_ticks; a follower
    # that hears nothing for election_ticks..2*election_ticks stands for election.
    tick_s: float = 0.05
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    rpc_timeout_s: float = 5.0
    # How long the ingress waits for a group's master to commit a proposal before it
    # gives that master up (paused, partitioned, its disk hung), finds the new one and
    # resends the proposal when every event in it has an id (otherwise it answers 503:
    # the write may still commit). Proposals of many bytes get longer (see ingest).
    propose_deadline_s: float = 1.0
    # 1: replicas honour fault files in their directories (tests of hung disks only).
    fault_injection: int = 0
    process_timeout_s: float = 600.0
    # Query limits: the longest range per interval, in days.
    query_minute_days_max: int = 31
    query_hour_days_max: int = 3 * 366
    query_day_days_max: int = 50 * 366
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 2)
    # When the API demands bearer tokens: auto, on or off (see flowray/api/auth.py).
    # The admin token itself is read from FLOWRAY_ADMIN_TOKEN by each API process and
    # is deliberately not a setting: settings travel in Ray runtime environments.
    auth: str = "auto"
    # Python modules imported by the processor and its tasks before processing, so the
    # processing logics they register (flowray.core.logic.register) can be named; comma
    # separated, and importable on every node (installed, or on PYTHONPATH).
    logic_modules: str = ""
    # Where the Parquet warehouse and its catalog live; empty: DATA_DIR/warehouse. On a
    # multi-node cluster it must be storage every node mounts at the same path.
    warehouse: str = ""
    # Wait for this many Ray nodes before placing the groups' replicas (a cluster's
    # workers join after the head starts flowray); 0: place on what is there.
    wait_nodes: int = 0
    # The group count the shards were first spread over (set from the data directory's
    # layout; groups added later start without shards). 0: the same as ``groups``.
    base_groups: int = 0

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


def _coerce(type_name: object, raw: str) -> Any:
    name = str(type_name)
    if name == "int":
        return int(raw)
    if name == "float":
        return float(raw)
    if name == "Path":
        return Path(raw)
    return raw
