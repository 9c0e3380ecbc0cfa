"""Start and stop a flowray cluster on Ray: replicas, processor, Serve app.

Used by ``flowray up`` (which then waits for a signal) and by the tests (which share
one Ray instance per session). Everything it starts is named in the cluster's Ray
namespace, so ``stop`` ends exactly what ``start`` began and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flowray.actors.names import PROCESSOR_NAME, RESTARTER_NAME, actor_name, gateway_name
from flowray.actors.processor import Processor
from flowray.actors.replica import Replica
from flowray.cluster.restarter import Restarter
from flowray.config import NODES_TIMEOUT_S, Settings
from flowray.core.entry import CONTROL_SHARD
from flowray.core.router import SITE_RULE, SITE_RULE_OLD
from flowray.serve.deployment import (
    APP_NAME,
    LOCAL_MODE_ENV,
    SETTINGS_ENV,
    deploy_api,
)
from flowray.serve.gateway import Gateway, require_port_free
from flowray.storage.durable import write_json_atomic

log = logging.getLogger("flowray.cluster.control")
START_TIMEOUT_S = 120.0


# A replica needs next to no CPU of its own reservation (it is I/O and the event loop);
# a bundle must hold some resource, so each takes this sliver of a CPU.
REPLICA_BUNDLE = {"CPU": 0.01}


def placement_strategy(replicas: int, nodes: int) -> str | None:
    """How a group's replicas are placed on ``nodes`` alive nodes.

    One node (local mode): no placement group, they pack. As many nodes as replicas or
    more: STRICT_SPREAD, one replica per node, so losing a node loses one copy of a
    group's log at most; Ray re-places a lost node's bundle on a node that holds none of
    the group's others (when there is one). Fewer: SPREAD, as distinct as they can be.
    """
    if nodes <= 1 or replicas <= 1:
        return None
    return "STRICT_SPREAD" if nodes >= replicas else "SPREAD"


def wait_for_nodes(wanted: int, timeout_s: float = NODES_TIMEOUT_S) -> int:
    """The number of live Ray nodes, once there are ``wanted`` (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if alive >= wanted or time.monotonic() > deadline:
            if alive < wanted:
                log.warning("only %d of %d nodes joined; placing replicas anyway", alive, wanted)
            return alive
        time.sleep(1.0)


class LayoutError(ValueError):
    """The data directory was made with another shard layout."""


class SiteRuleError(LayoutError):
    """The data directory's site names were normalized by another rule than this
    release's (so some of its sites would be looked for under other names)."""


# A file of its own beside layout.json: the layout says where shards live, this says
# how names became shard keys, and `flowray migrate-sites` rewrites it alone.
SITE_RULE_FILE = "site_rule.json"


# The allocator settings of every process of a local cluster (the cluster files put
# the same on `ray start`). glibc: payloads of up to a few MiB (a 10,000-event request
# is about 600 KiB) stay on the heap's fast path; bigger blocks (live counts' arrays)
# get their own mmap, given back when freed. The fixed threshold also stops glibc
# raising it to 32 MiB after such a free. What payloads leave free inside the heap goes
# back to the OS through memtrim's periodic malloc_trim. Arrow allocates from that
# same heap rather than its bundled mimalloc, which gave freed pages back within
# milliseconds and faulted them in again on the next request: batched seed-line
# ingest rose 13 % (119 -> 134 requests/s in A/B). See BENCHMARKS.md, memory.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4194304",
    "MALLOC_TRIM_THRESHOLD_": "8388608",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
}


def init_ray(settings: Settings) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], namespace=settings.namespace)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Every process of a local cluster inherits these (see MALLOC_ENV).
    for name, value in MALLOC_ENV.items():
        os.environ.setdefault(name, value)
    # Ray lowers its workers' priority (nice 15) by default; flowray's actors are the
    # server, so they run at normal priority beside the load they serve.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        # A new local instance: without it, Ray joins a cluster recorded in
        # /tmp/ray/ray_current_cluster (another one started on this machine, or the
        # record of one killed) and refuses num_cpus for it.
        address="local",
        num_cpus=settings.num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        namespace=settings.namespace,
        object_store_memory=1024 * 1024 * 1024,
        logging_level=logging.WARNING,
    )


def settle_layout(settings: Settings) -> Settings:
    """The shard layout is fixed by the first ``up`` over a data directory.

    A site's shard depends on the shard count, so a different count over old data
    would route sites to shards that do not hold their history; the replica count is
    fixed too. Groups may be added (never removed): the new groups start without
    shards, which ``flowray move-shard`` then gives them. Returns ``settings`` with
    ``base_groups``, the group count the shards were first spread over.
    """
    settings.validate()
    settle_site_rule(settings)
    path = settings.layout_file
    if not path.exists():
        layout = {"groups": settings.groups, "replicas": settings.replicas}
        layout |= {"shards": settings.shards, "base_groups": settings.groups}
        write_json_atomic(path, layout)
        return settings.replace(base_groups=settings.groups)
    stored = json.loads(path.read_text())
    base = int(stored.get("base_groups", stored["groups"]))
    same = stored["replicas"] == settings.replicas and stored["shards"] == settings.shards
    if not same or settings.groups < stored["groups"]:
        raise LayoutError(
            f"{settings.data_dir} holds data made with groups={stored['groups']}, "
            f"replicas={stored['replicas']}, shards={stored['shards']}; start with those "
            f"values (more groups are allowed) or use another --data-dir"
        )
    if settings.groups > stored["groups"] or "base_groups" not in stored:
        write_json_atomic(path, {**stored, "groups": settings.groups, "base_groups": base})
    return settings.replace(base_groups=base)


def stored_site_rule(data_dir: Path) -> str | None:
    """The site rule recorded for ``data_dir``; None when none is."""
    path = data_dir / SITE_RULE_FILE
    return str(json.loads(path.read_text())["site_rule"]) if path.exists() else None


def holds_site_data(settings: Settings) -> bool:
    """Whether events were ever written here: a replica's block of a data shard (the
    control shard holds only seals and no-ops), or a warehouse file."""
    control = f"s{CONTROL_SHARD:04d}"
    for shard_dir in settings.data_dir.glob("groups/*/*/blocks/s*"):
        if shard_dir.name != control and any(shard_dir.glob("*.seg")):
            return True
    return any(settings.warehouse_dir.glob("data/*/s*/*.parquet"))


def settle_site_rule(settings: Settings) -> None:
    """Stored site names are normalized, and a site's shard is a hash of that name, so a
    data directory records the rule that made its names. One with data but no record
    was written by the old rule: refused until ``flowray migrate-sites`` has reported
    the sites whose names the new rule changes and recorded the new rule."""
    stored = stored_site_rule(settings.data_dir)
    if stored == SITE_RULE:
        return
    if stored is None and not holds_site_data(settings):
        write_json_atomic(settings.data_dir / SITE_RULE_FILE, {"site_rule": SITE_RULE})
        return
    if stored is None:
        raise SiteRuleError(
            f"{settings.data_dir} holds data whose site names were normalized by the old "
            f"rule ({SITE_RULE_OLD}); this release names sites by UTS #46 as browsers do, "
            "which changes a few internationalized names (ß, ς, zero-width joiners, emoji). "
            f"Run `flowray migrate-sites --data-dir {settings.data_dir}` to see which, then "
            "again with --apply to start on this directory"
        )
    raise SiteRuleError(
        f"{settings.data_dir} holds site names normalized by the site rule {stored!r}, "
        f"which this release (rule {SITE_RULE!r}) does not know; start the release that "
        "wrote them"
    )


@dataclass
class Cluster:
    settings: Settings
    replicas: dict[tuple[int, int], Any]
    processor: Any
    gateways: list[Any] = field(default_factory=list)
    placement_groups: list[Any] = field(default_factory=list)
    restarter: Any = None  # held: a non-detached actor ends with its last handle

    def masters(self, timeout_s: float = START_TIMEOUT_S) -> dict[int, int]:
        """The master replica of every group, waiting for elections to finish."""
        deadline = time.monotonic() + timeout_s
        found: dict[int, int] = {}
        while time.monotonic() < deadline:
            for g in range(self.settings.groups):
                answers = ray.get(
                    [self.replicas[(g, r)].leader.remote() for r in range(self.settings.replicas)],
                    timeout=self.settings.rpc_timeout_s,
                )
                claims = [
                    (term, r) for r, (_l, term, role) in enumerate(answers) if role == "master"
                ]
                if claims:
                    found[g] = max(claims)[1]
            if len(found) == self.settings.groups:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"no master elected within {timeout_s} s: {found}")


def resolved(settings: Settings) -> Settings:
    """``settings`` with its directories absolute (the actors run elsewhere)."""
    return settings.replace(
        data_dir=settings.data_dir.resolve(),
        warehouse=str(Path(settings.warehouse).resolve()) if settings.warehouse else "",
    )


def start(settings: Settings, serve_app: bool = True) -> Cluster:
    """Create the groups, wait for their masters, start the processor and the API."""
    settings = resolved(settle_layout(settings))
    init_ray(settings)
    running = start_backend(settings, gateway=serve_app)
    if serve_app:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        deploy_api(settings)
    return running


def start_backend(settings: Settings, gateway: bool = True, detached: bool = False) -> Cluster:
    """The shard groups (placed, masters elected), the processor and the ingest gateway.

    ``detached``: the actors and placement groups outlive the process that starts them
    and are found by name if they exist (``serve deploy``'s application builder, which
    runs in a short-lived task, starts them so; ``stop_named`` ends them).
    """
    if gateway and settings.ingest_port and not detached:  # detached: ours may hold it
        require_port_free(settings.host, settings.ingest_port)  # before starting anything
    blob = settings.to_json()
    ns = settings.namespace
    extra: dict[str, Any] = {"lifetime": "detached", "get_if_exists": True} if detached else {}
    nodes = wait_for_nodes(settings.wait_nodes)
    strategy = placement_strategy(settings.replicas, nodes)
    replicas = {}
    groups_placed = []
    for g in range(settings.groups):
        group_pg = None
        if strategy is not None:
            group_pg = _group_placement(settings, g, strategy, detached)
            groups_placed.append(group_pg)
        for r in range(settings.replicas):
            options: dict[str, Any] = {"name": actor_name(g, r), "namespace": ns, **extra}
            if group_pg is not None:
                options["num_cpus"] = REPLICA_BUNDLE["CPU"]
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=group_pg, placement_group_bundle_index=r
                )
            replicas[(g, r)] = Replica.options(**options).remote(  # type: ignore[attr-defined]
                blob, g, r
            )
    ray.get([h.start.remote() for h in replicas.values()], timeout=START_TIMEOUT_S)
    running = Cluster(settings, replicas, None, placement_groups=groups_placed)
    running.masters()
    running.processor = Processor.options(  # type: ignore[attr-defined]
        name=PROCESSOR_NAME, namespace=ns, **extra
    ).remote(blob)
    ray.get(running.processor.start.remote(), timeout=START_TIMEOUT_S)
    # Idle until the API asks for a rolling restart; found by name (RESTARTER_NAME).
    running.restarter = Restarter.options(  # type: ignore[attr-defined]
        name=RESTARTER_NAME, namespace=ns, **extra
    ).remote(blob)
    if gateway and settings.ingest_port:
        env = {SETTINGS_ENV: json.dumps(blob), LOCAL_MODE_ENV: os.environ.get(LOCAL_MODE_ENV, "1")}
        running.gateways = [
            Gateway.options(  # type: ignore[attr-defined]
                name=gateway_name(i), namespace=ns, runtime_env={"env_vars": env}, **extra
            ).remote(settings.host, settings.ingest_port)
            for i in range(settings.gateways)
        ]
        ray.get([g.start.remote() for g in running.gateways], timeout=START_TIMEOUT_S)
    return running


def _placement_name(namespace: str, group: int) -> str:
    return f"{namespace}-group-{group}"


def _group_placement(settings: Settings, group: int, strategy: str, detached: bool) -> Any:
    name = _placement_name(settings.namespace, group)
    if detached:
        with contextlib.suppress(ValueError):  # none by that name yet
            found = get_placement_group(name)
            ray.get(found.ready(), timeout=START_TIMEOUT_S)
            return found
    made = placement_group(
        [dict(REPLICA_BUNDLE) for _ in range(settings.replicas)],
        strategy=strategy,
        name=name,
        lifetime="detached" if detached else None,
    )
    ray.get(made.ready(), timeout=START_TIMEOUT_S)
    return made


def stop_named(settings: Settings) -> list[str]:
    """End, by name, every actor and placement group of the cluster in ``settings``'s
    namespace (those ``start_backend(detached=True)`` made); returns what it ended."""
    ns = settings.namespace
    names = [actor_name(g, r) for g in range(settings.groups) for r in range(settings.replicas)]
    names += [PROCESSOR_NAME, RESTARTER_NAME]
    names += [gateway_name(i) for i in range(settings.gateways)]
    ended = []
    for name in names:
        with contextlib.suppress(ValueError):  # not running
            ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
            ended.append(name)
    for g in range(settings.groups):
        with contextlib.suppress(ValueError):  # none by that name
            remove_placement_group(get_placement_group(_placement_name(ns, g)))
            ended.append(f"placement group {_placement_name(ns, g)}")
    return ended


def stop(cluster: Cluster, serve_app: bool = True) -> None:
    """Stop the API, the processor and the replicas this cluster started."""
    if serve_app:
        with contextlib.suppress(Exception):  # Serve already gone: nothing left to stop
            serve.delete(APP_NAME)
    with contextlib.suppress(Exception):  # the processor died already
        ray.get(cluster.processor.stop.remote(), timeout=10)
    for gw in cluster.gateways:
        with contextlib.suppress(Exception):  # the gateway died already
            ray.get(gw.stop.remote(), timeout=15)
    for handle in [cluster.processor, *cluster.replicas.values(), *cluster.gateways]:
        ray.kill(handle, no_restart=True)
    with contextlib.suppress(ValueError):  # a cluster started without one
        ray.kill(
            ray.get_actor(RESTARTER_NAME, namespace=cluster.settings.namespace), no_restart=True
        )
    for group_pg in cluster.placement_groups:
        with contextlib.suppress(Exception):  # gone with its actors already
            remove_placement_group(group_pg)
