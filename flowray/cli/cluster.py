"""Cluster lifecycle commands: up, down, status, restart, move-shard."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from flowray.cli.common import (
    DOWN_TIMEOUT_S,
    JOB_TIMEOUT_S,
    UP_TIMEOUT_S,
    DataDir,
    Url,
    app,
    ask,
    client_for,
    console,
    err,
    fail,
    pid_alive,
    read_record,
    session_pids,
    versions_table,
)
from flowray.client import ApiError, Client
from flowray.config import DEFAULT_DATA_DIR, NODES_TIMEOUT_S, Settings
from flowray.storage.durable import write_json_atomic


@app.command()
def up(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    port: Annotated[int, typer.Option(help="HTTP port of the API (Ray Serve).")] = 8000,
    ingest_port: Annotated[
        int, typer.Option(help="HTTP port of the ingest gateway (0: none).")
    ] = 8001,
    groups: Annotated[int, typer.Option(help="Shard groups.")] = 2,
    replicas: Annotated[int, typer.Option(help="Replicas per group (odd).")] = 3,
    shards: Annotated[int, typer.Option(help="Shards (fixed once data exists).")] = 8,
    gateways: Annotated[
        int | None,
        typer.Option(
            help="Ingest gateway processes sharing the ingest port (default 2, or "
            "FLOWRAY_GATEWAYS): parsing runs on as many cores."
        ),
    ] = None,
    detach: Annotated[bool, typer.Option(help="Return once the API answers.")] = False,
    wait_nodes: Annotated[
        int,
        typer.Option(
            help="Wait (up to 10 min) for this many Ray nodes before placing replicas, so "
            "a group's replicas land on distinct nodes (a joined cluster)."
        ),
    ] = 0,
) -> None:
    """Start a local Ray cluster (or join RAY_ADDRESS), the shard groups and the API."""
    data_dir = data_dir.resolve()
    record = read_record(data_dir)
    if record and pid_alive(int(record["pid"])):
        fail(
            f"a cluster is already running for {data_dir} at {record['url']} "
            f"(pid {record['pid']}); stop it with 'flowray down'"
        )
    try:
        settings = Settings.from_env(
            data_dir=data_dir,
            port=port,
            ingest_port=ingest_port,
            groups=groups,
            replicas=replicas,
            shards=shards,
            wait_nodes=wait_nodes or None,
            gateways=gateways,
        ).validate()
    except ValueError as exc:
        fail(str(exc))
        return
    if detach:
        _up_detached(settings)
        return
    _up_foreground(settings)


def _up_detached(settings: Settings) -> None:
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "up.log"
    args = [
        sys.executable,
        "-m",
        "flowray",
        "up",
        "--data-dir",
        str(settings.data_dir),
        "--port",
        str(settings.port),
        "--ingest-port",
        str(settings.ingest_port),
        "--groups",
        str(settings.groups),
        "--replicas",
        str(settings.replicas),
        "--shards",
        str(settings.shards),
        "--gateways",
        str(settings.gateways),
    ]
    with open(log_path, "ab") as out:
        child = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    waiting = NODES_TIMEOUT_S if settings.wait_nodes else 0.0
    deadline = time.monotonic() + UP_TIMEOUT_S + waiting
    url = f"http://{settings.host}:{settings.port}"
    with Client(url) as client:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                tail = log_path.read_text()[-3000:]
                fail(f"flowray up exited with {child.returncode}; log {log_path}:\n{tail}")
            record = read_record(settings.data_dir)
            if record and record.get("pid") == child.pid and client.healthy():
                console.print(f"flowray is up at {url} (pid {child.pid}, log {log_path})")
                return
            time.sleep(0.5)
    fail(f"the API did not answer within {UP_TIMEOUT_S + waiting:.0f} s; see {log_path}")


def _up_foreground(settings: Settings) -> None:
    if not os.environ.get("RAY_ADDRESS"):
        # Read by Ray at import: a local single-node Ray then binds only to loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from flowray.cluster import control as cluster
    from flowray.query.cache import redis_answers

    if not redis_answers(settings.redis_url):
        console.print(f"no Redis at {settings.redis_url or '(none)'}: using the in-process cache")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        running = cluster.start(settings)
    except cluster.LayoutError as exc:
        fail(str(exc))
        return
    url = f"http://{settings.host}:{settings.port}"
    write_json_atomic(
        settings.cluster_file,
        {
            "pid": os.getpid(),
            "url": url,
            "ingest_url": f"http://{settings.host}:{settings.ingest_port}"
            if settings.ingest_port
            else url,
            "data_dir": str(settings.data_dir),
            "started_ms": int(time.time() * 1000),
            "ray_pids": _ray_child_pids(),
        },
    )
    ingest = f" (ingest gateway on port {settings.ingest_port})" if settings.ingest_port else ""
    console.print(f"flowray is serving {url}{ingest} (data in {settings.data_dir}); Ctrl-C to stop")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        console.print("stopping flowray ...")
        cluster.stop(running)
        import ray

        ray.shutdown()
        with contextlib.suppress(FileNotFoundError):
            settings.cluster_file.unlink()


def _ray_child_pids() -> list[int]:
    """Pids of the Ray processes this process started (empty when it joined a cluster)."""
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 - no public API for this
        if node is None or not node.head:
            return []
        return [
            int(info.process.pid)
            for infos in node.all_processes.values()
            for info in infos
            if info.process is not None
        ]
    except Exception:  # best effort: down falls back to the main pid only
        return []


@app.command()
def down(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    named: Annotated[
        bool,
        typer.Option(
            "--named",
            help="End the named actors of a cluster deployed with 'serve deploy' "
            "(deploy/serve.yaml), joining the Ray cluster in RAY_ADDRESS.",
        ),
    ] = False,
) -> None:
    """Stop the cluster that 'flowray up' started for this data directory."""
    data_dir = data_dir.resolve()
    if named:
        _down_named(data_dir)
        return
    record = read_record(data_dir)
    if record is None:
        fail(f"no running cluster recorded in {data_dir}")
        return
    pid = int(record["pid"])
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            err.print(f"pid {pid} did not stop in {DOWN_TIMEOUT_S:.0f} s; killing it")
            os.kill(pid, signal.SIGKILL)
    # 'up --detach' runs in a session of its own: whatever is left in it (Ray agents
    # that outlive their raylet) was started by us, and nothing else is in it.
    leftovers = set(session_pids(pid)) | {int(p) for p in record.get("ray_pids", [])}
    leftovers.discard(os.getpid())
    for child in sorted(leftovers):
        if pid_alive(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    # A killed process holds its ports and files until it has exited: 'down' returns
    # when they are free, so an 'up' right after it can bind the same ports.
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while any(pid_alive(child) for child in leftovers) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "cluster.json").unlink()
    console.print("flowray is down")


def _down_named(data_dir: Path) -> None:
    import ray

    from flowray.cluster import control as cluster

    layout = data_dir / "layout.json"
    if not layout.exists():
        fail(f"no flowray data in {data_dir} (no layout.json): which cluster to stop?")
    settings = Settings.from_env(data_dir=data_dir, **json.loads(layout.read_text()))
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=settings.namespace)
    try:
        ended = cluster.stop_named(settings)
    finally:
        ray.shutdown()
    console.print(f"ended: {', '.join(ended) or 'nothing (none was running)'}")


@app.command()
def status(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every group's replicas (role, term, last and committed index, pid, node) and more."""
    body = ask(data_dir, url, lambda c: c.status())
    if as_json:
        console.print_json(data=body)
        return
    table = Table(title="flowray groups")
    for col in (
        "group",
        "replica",
        "role",
        "term",
        "last",
        "committed",
        "pid",
        "node",
        "open",
        "sealed",
    ):
        table.add_column(col)
    for group in body["groups"]:
        for r in group["replicas"]:
            table.add_row(
                *(
                    str(r.get(k, "-"))
                    for k in (
                        "group",
                        "replica",
                        "role",
                        "term",
                        "last_index",
                        "commit_index",
                        "pid",
                    )
                ),
                str(r.get("node", "-"))[:12],
                str(r.get("blocks_open", "-")),
                str(r.get("blocks_sealed", "-")),
            )
    console.print(table)
    masters = [r for g in body["groups"] for r in g["replicas"] if r.get("role") == "master"]
    pending = sum(r.get("sealed_pending") or 0 for r in masters)
    late = sum(r.get("late_events") or 0 for r in masters)
    proc = body.get("processor", {})
    console.print(
        f"pending: {pending} sealed blocks not yet published; late events (since the "
        f"masters started): {late}; units re-published for late events: "
        f"{proc.get('republished_units')}; shard-days merged: {proc.get('merged_days')}"
    )
    console.print(
        f"warehouse: {proc.get('catalog')}  jobs: {proc.get('jobs')}  "
        f"last job: {proc.get('last_job')}  cache: {body.get('cache')}"
    )
    if proc.get("shard_owners"):
        owners = ", ".join(f"{s}->g{g}" for s, g in enumerate(proc["shard_owners"]))
        console.print(f"shards (shard->group): {owners}")
    if proc.get("versions"):
        console.print(versions_table(proc["versions"]))
    for job in proc.get("jobs_running") or []:
        console.print(f"running: {job['kind']} job {job['job']} ({job['done']}/{job['total']})")
    if proc.get("last_error"):
        console.print(f"[yellow]last processing error:[/yellow] {proc['last_error']}")


@app.command()
def restart(
    rolling: Annotated[
        bool,
        typer.Option(
            "--rolling/--no-rolling",
            help="Replace processes one at a time, never all at once (the only mode).",
        ),
    ] = True,
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
) -> None:
    """Restart every process of the running cluster one at a time: each group's
    followers, then its master after handing mastership over, then the processor, the
    ingest gateway and the Serve replicas. New processes load the code installed now,
    so this is how flowray is upgraded without downtime."""
    if not rolling:
        fail("only --rolling is supported: for a full restart use 'flowray down' and 'up'")
    with client_for(data_dir, url, admin=True) as client:
        try:
            started = client.restart()
            with Progress(
                TextColumn("rolling restart"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps {task.description}"),
                console=err,
                transient=True,
            ) as bar:
                task = bar.add_task("", total=started.get("total"))

                def show(state: dict[str, Any]) -> None:
                    steps = state.get("steps") or [""]
                    bar.update(
                        task,
                        total=state.get("total"),
                        completed=state.get("done", 0),
                        description=steps[-1],
                    )

                state = client.wait_job(started, JOB_TIMEOUT_S, show)
        except (ApiError, OSError, TimeoutError) as exc:
            fail(str(exc))
            return
    for step in state["steps"]:
        console.print(f"- {step}")
    console.print(f"rolling restart done in {state.get('seconds')} s")


@app.command("move-shard")
def move_shard(
    shard: Annotated[int, typer.Argument(help="The shard to move (see 'flowray status').")],
    to: Annotated[int, typer.Option("--to", help="The group that takes its new writes.")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
) -> None:
    """Send a shard's new writes to another group (to spread load over new groups).

    Its older blocks stay where they are; processing reads every group that ever
    owned the shard, so nothing is moved on disk and nothing is lost."""
    result = ask(data_dir, url, lambda c: c.move_shard(shard, to))
    console.print(
        f"shard {result['shard']}: group {result['from_group']} -> {result['to_group']}; "
        f"owners now {result['owners']}"
    )
