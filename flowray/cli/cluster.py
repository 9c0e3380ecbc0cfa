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

import orjson
import typer
from rich.console import RenderableType
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from flowray.cli.common import (
    CALL_ERRORS,
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
from flowray.client import Client
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
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the API's answer as it is, in JSON.")
    ] = False,
) -> None:
    """Every group's replicas (role, term, commit and last index, pid, node), the
    processor and the warehouse."""
    body = ask(data_dir, url, lambda c: c.status())
    if as_json:
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for part in status_view(body):
        console.print(part)


def status_view(body: dict[str, Any]) -> list[RenderableType]:
    """What 'flowray status' prints for the answer of GET /v1/admin/status: tables of
    the replicas, the processor and the warehouse, then whatever needs attention."""
    proc = body.get("processor") or {}
    masters = [
        r for g in body.get("groups", []) for r in g["replicas"] if r.get("role") == "master"
    ]
    parts: list[RenderableType] = [replicas_table(body), processor_table(proc, masters)]
    parts.append(warehouse_table(proc.get("catalog") or {}, proc, body.get("cache")))
    if proc.get("versions"):
        parts.append(versions_table(proc["versions"]))
    replicas = [r for g in body.get("groups", []) for r in g["replicas"]]
    for r in replicas:
        if r.get("status") == "down":
            parts.append(
                Text(f"group {r.get('group')} replica {r.get('replica')}: {r.get('error')}", "red")
            )
    if proc.get("status") == "down":
        parts.append(Text(f"processor: {proc.get('error')}", "red"))
    if proc.get("last_error"):
        parts.append(Text(f"last processing error: {proc['last_error']}", "yellow"))
    return parts


ROLE_STYLES = {"master": "bold green", "candidate": "yellow", "down": "bold red"}
NODE_ID_SHOWN = 12


def replicas_table(body: dict[str, Any]) -> Table:
    """One row per replica; a replica that did not answer shows as down."""
    layout = body.get("layout") or {}
    caption = (
        f"{layout['groups']} groups x {layout['replicas']} replicas, {layout['shards']} shards"
        if layout
        else None
    )
    table = Table(title="groups", caption=caption)
    for col in ("group", "replica", "role", "term", "commit/last", "pid", "node", "host"):
        table.add_column(col, justify="right" if col in ("term", "commit/last", "pid") else "left")
    table.add_column("blocks open/sealed", justify="right")
    for group in body.get("groups", []):
        for r in group["replicas"]:
            role = "down" if r.get("status") == "down" else str(r.get("role", "-"))
            shown = role + (" (abstaining)" if r.get("abstaining") else "")
            cells = [
                str(r.get("group", group.get("group"))),
                str(r.get("replica", "-")),
                _cell(r.get("term")),
                f"{_cell(r.get('commit_index'))}/{_cell(r.get('last_index'))}",
                _cell(r.get("pid")),
                _cell(r.get("node"))[:NODE_ID_SHOWN],
                _cell(r.get("host")),
                f"{_cell(r.get('blocks_open'))}/{_cell(r.get('blocks_sealed'))}",
            ]
            # Text, not str: a host or node name is data, never rich markup.
            table.add_row(
                *map(Text, cells[:2]), Text(shown, ROLE_STYLES.get(role, "")), *map(Text, cells[2:])
            )
    return table


def processor_table(proc: dict[str, Any], masters: list[dict[str, Any]]) -> Table:
    """The processor: its jobs, the last one, and the work still waiting (which the
    groups' masters count)."""
    pending = sum(r.get("sealed_pending") or 0 for r in masters)
    late = sum(r.get("late_events") or 0 for r in masters)
    last = proc.get("last_job") or {}
    last_job = (
        f"{last.get('blocks')} blocks -> {last.get('units')} units, "
        f"{last.get('events')} events in {last.get('seconds')} s"
        if last
        else "none yet"
    )
    running = ", ".join(
        f"{j['kind']} {j['job']} ({j.get('done')}/{j.get('total')})"
        for j in proc.get("jobs_running") or []
    )
    return _pairs_table(
        "processor",
        [
            ("state", "down" if proc.get("status") == "down" else "up"),
            ("pid", _cell(proc.get("pid"))),
            ("jobs published", _cell(proc.get("jobs"))),
            ("last job", last_job),
            ("running", running or "-"),
            ("sealed blocks not yet published", str(pending)),
            ("late events (since the masters started)", str(late)),
            ("units re-published (late events)", _cell(proc.get("republished_units"))),
            ("shard-days merged", _cell(proc.get("merged_days"))),
        ],
    )


def warehouse_table(catalog: dict[str, Any], proc: dict[str, Any], cache: Any) -> Table:
    """The current warehouse version, how far it is final, and where shards write."""
    watermark = catalog.get("watermark_ms")
    final = (
        "-"
        if watermark is None
        else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(watermark / 1000))
    )
    owners = proc.get("shard_owners") or []
    return _pairs_table(
        "warehouse",
        [
            ("current version", _cell(catalog.get("current_version"))),
            ("generation", _cell(catalog.get("generation"))),
            ("units", _cell(catalog.get("units"))),
            ("events", _cell(catalog.get("events"))),
            ("final up to", final),
            ("shards (shard->group)", ", ".join(f"{s}->g{g}" for s, g in enumerate(owners))),
            ("query cache", _cell(cache)),
        ],
    )


def _pairs_table(title: str, pairs: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in pairs:
        table.add_row(key, Text(value or "-"))
    return table


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


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
        except CALL_ERRORS as exc:
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
