"""The ``flowray`` command line: run a cluster, feed it, process, query.

Commands that talk to a running cluster find its URL in the data directory (written
by ``flowray up``) or take ``--url`` / ``FLOWRAY_URL``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flowray.client import ApiError, Client, ClusterNotFound, find_url
from flowray.config import DEFAULT_DATA_DIR, NODES_TIMEOUT_S, Settings
from flowray.storage.durable import write_json_atomic

app = typer.Typer(
    help="flowray: minute-by-minute web traffic analytics on Ray.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="FLOWRAY_DATA_DIR", help="Where the cluster keeps its data."),
]
Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="FLOWRAY_URL",
        help="API URL of a running cluster (default: the one recorded in --data-dir).",
    ),
]
UP_TIMEOUT_S = 180.0
DOWN_TIMEOUT_S = 60.0
BAD_LINES_SHOWN_MAX = 20


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _client(data_dir: Path, url: str | None, ingest: bool = False, admin: bool = False) -> Client:
    """A client for the cluster, with FLOWRAY_TOKEN, or for admin calls the admin token."""
    tokens = [os.environ.get("FLOWRAY_TOKEN"), os.environ.get("FLOWRAY_ADMIN_TOKEN")]
    if admin:
        tokens.reverse()
    try:
        if ingest and not url:
            url = find_url(data_dir, None, key="ingest_url")
        return Client(find_url(data_dir, url), token=next((t for t in tokens if t), None))
    except ClusterNotFound as exc:
        _fail(str(exc))
        raise  # unreachable; for the type checker


def _ask(data_dir: Path, url: str | None, call: Callable[[Client], Any]) -> Any:
    """``call`` on an admin client of the running cluster; a failure ends the command."""
    with _client(data_dir, url, admin=True) as client:
        try:
            return call(client)
        except (ApiError, OSError) as exc:
            _fail(str(exc))
            return None


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _session_pids(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (Linux /proc; empty elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _record(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / "cluster.json"
    if not path.exists():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record


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
    record = _record(data_dir)
    if record and _pid_alive(int(record["pid"])):
        _fail(
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
        _fail(str(exc))
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
                _fail(f"flowray up exited with {child.returncode}; log {log_path}:\n{tail}")
            record = _record(settings.data_dir)
            if record and record.get("pid") == child.pid and client.healthy():
                console.print(f"flowray is up at {url} (pid {child.pid}, log {log_path})")
                return
            time.sleep(0.5)
    _fail(f"the API did not answer within {UP_TIMEOUT_S + waiting:.0f} s; see {log_path}")


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
        _fail(str(exc))
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
    record = _record(data_dir)
    if record is None:
        _fail(f"no running cluster recorded in {data_dir}")
        return
    pid = int(record["pid"])
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(pid):
            err.print(f"pid {pid} did not stop in {DOWN_TIMEOUT_S:.0f} s; killing it")
            os.kill(pid, signal.SIGKILL)
    # 'up --detach' runs in a session of its own: whatever is left in it (Ray agents
    # that outlive their raylet) was started by us, and nothing else is in it.
    leftovers = set(_session_pids(pid)) | {int(p) for p in record.get("ray_pids", [])}
    leftovers.discard(os.getpid())
    for child in sorted(leftovers):
        if _pid_alive(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    # A killed process holds its ports and files until it has exited: 'down' returns
    # when they are free, so an 'up' right after it can bind the same ports.
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while any(_pid_alive(child) for child in leftovers) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "cluster.json").unlink()
    console.print("flowray is down")


def _down_named(data_dir: Path) -> None:
    import ray

    from flowray.cluster import control as cluster

    layout = data_dir / "layout.json"
    if not layout.exists():
        _fail(f"no flowray data in {data_dir} (no layout.json): which cluster to stop?")
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
    body = _ask(data_dir, url, lambda c: c.status())
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
        console.print(_versions_table(proc["versions"]))
    for job in proc.get("jobs_running") or []:
        console.print(f"running: {job['kind']} job {job['job']} ({job['done']}/{job['total']})")
    if proc.get("last_error"):
        console.print(f"[yellow]last processing error:[/yellow] {proc['last_error']}")


def _event_dicts(table: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


@app.command()
def ingest(
    files: Annotated[list[Path], typer.Argument(help="Log files (plain or .gz).")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    format: Annotated[str, typer.Option(help="auto, seed, combined or ndjson.")] = "auto",
    site: Annotated[
        str | None, typer.Option(help="Site of every event (needed for combined logs).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Events per request.")] = 5000,
) -> None:
    """Stream events from files to the API, with a progress bar; bad lines are reported."""
    from flowray.ingest import events as ev

    if format not in ev.FORMATS:
        _fail(f"--format must be one of {', '.join(ev.FORMATS)}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        _fail(f"no such file: {', '.join(missing)}")
    accepted, bad_total = 0, 0
    with (
        _client(data_dir, url, ingest=True) as client,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as progress,
    ):
        for path in files:
            task = progress.add_task(path.name, total=path.stat().st_size)
            limits = ev.Limits(now_ms=int(time.time() * 1000))
            try:
                chunks = ev.iter_file(path, format, limits, site=site, chunk_lines=batch)
                for chunk in chunks:
                    for item in chunk.bad:
                        bad_total += 1
                        if bad_total <= BAD_LINES_SHOWN_MAX:
                            progress.console.print(f"{path}:{item.position}: {item.reason}")
                    if chunk.events.num_rows:
                        accepted += client.send_events(_event_dicts(chunk.events))
                    progress.update(task, advance=chunk.bytes)
            except (ValueError, ApiError, OSError) as exc:
                _fail(f"{path}: {exc}")
    if bad_total > BAD_LINES_SHOWN_MAX:
        err.print(f"... and {bad_total - BAD_LINES_SHOWN_MAX} more bad lines")
    console.print(f"accepted {accepted} events; {bad_total} bad lines skipped")


@app.command()
def process(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    all_blocks: Annotated[
        bool, typer.Option("--all", help="Also seal blocks of hours that are still open.")
    ] = False,
) -> None:
    """Seal and process every block that is due now (normally automatic)."""
    with _client(data_dir, url, admin=True) as client, err.status("processing ..."):
        try:
            result = client.process("all" if all_blocks else "closed")
        except (ApiError, OSError) as exc:
            _fail(str(exc))
            return
    console.print(
        f"processed {result['blocks']} blocks into {result['units']} units "
        f"({result['events']} events) in {result['seconds']} s; "
        f"generation {result['generation']}"
    )


JOB_TIMEOUT_S = 24 * 3600.0
CHANGES_SHOWN = 20


def _follow_job(client: Client, job: dict[str, Any], label: str) -> dict[str, Any]:
    """Wait for a processor job with a progress bar over the units it re-makes."""
    with Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} units"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def show(state: dict[str, Any]) -> None:
            bar.update(task, total=state.get("total"), completed=state.get("done", 0))

        state = client.wait_job(job, JOB_TIMEOUT_S, show)
    result: dict[str, Any] = state["result"]
    return result


def _print_changes(result: dict[str, Any], shown: int) -> None:
    changes = result["changes"]
    if changes:
        table = Table(title=f"sites changed: {result['sites_changed']}")
        table.add_column("site")
        table.add_column("buckets changed", justify="right")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for row in changes[:shown]:
            table.add_row(
                row["site"], str(row["buckets_changed"]), str(row["before"]), str(row["after"])
            )
        console.print(table)
        if len(changes) > shown:
            console.print(f"... and {result['sites_changed'] - shown} more sites (see --json)")
    console.print(
        f"{result['units']} units; {result['sites_examined']} sites examined, "
        f"{result['sites_changed']} changed, {result['buckets_changed']} buckets changed; "
        f"events {result['events_before']} -> {result['events_after']}"
    )


@app.command()
def reprocess(
    start: Annotated[str, typer.Option(help="Inclusive start (ISO-8601, date, epoch ms).")],
    end: Annotated[str, typer.Option(help="Exclusive end (ISO-8601, date, epoch ms).")],
    site: Annotated[
        list[str] | None, typer.Option("--site", help="Only this site (repeatable).")
    ] = None,
    logic: Annotated[
        str | None, typer.Option(help="Processing logic (default: the current version's).")
    ] = None,
    logic_module: Annotated[
        list[str] | None,
        typer.Option(
            "--logic-module",
            help="Module that registers the logic (repeatable); must be importable by the "
            "cluster's processes.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; publish nothing.")
    ] = False,
    tz: Annotated[str, typer.Option(help="Time zone of --start/--end without one.")] = "UTC",
    as_json: Annotated[bool, typer.Option("--json", help="The full result as JSON.")] = False,
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
) -> None:
    """Re-process published hours from the retained raw log, show what changes, and
    publish the result as a new warehouse version (atomically)."""
    request = {
        "start": start,
        "end": end,
        "tz": tz,
        "sites": site or None,
        "logic": logic,
        "logic_modules": logic_module or [],
        "dry_run": dry_run,
    }
    with _client(data_dir, url, admin=True) as client:
        try:
            result = _follow_job(client, client.reprocess(**request), "re-processing")
        except (ApiError, OSError, TimeoutError) as exc:
            _fail(str(exc))
            return
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    _print_changes(result, CHANGES_SHOWN)
    if result["dry_run"]:
        console.print(f"dry run: nothing published; version {result['from_version']} stays")
    else:
        console.print(
            f"published version {result['version']} (logic {result['logic']}), "
            f"replacing version {result['from_version']}; 'flowray rollback' returns to it"
        )


@app.command()
def rollback(
    to: Annotated[
        int | None, typer.Option("--to", help="Version to return to (default: the previous).")
    ] = None,
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
) -> None:
    """Return the warehouse to the previous version (hours processed since are re-made
    with that version's logic)."""
    with _client(data_dir, url, admin=True) as client:
        try:
            result = _follow_job(client, client.rollback(to), "rolling back")
        except (ApiError, OSError, TimeoutError) as exc:
            _fail(str(exc))
            return
    console.print(
        f"version {result['version']} (logic {result['logic']}) is current again, "
        f"replacing version {result['from_version']}; "
        f"{result['units_brought_up_to_date']} units brought up to date"
    )


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
        _fail("only --rolling is supported: for a full restart use 'flowray down' and 'up'")
    with _client(data_dir, url, admin=True) as client:
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
            _fail(str(exc))
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
    result = _ask(data_dir, url, lambda c: c.move_shard(shard, to))
    console.print(
        f"shard {result['shard']}: group {result['from_group']} -> {result['to_group']}; "
        f"owners now {result['owners']}"
    )


@app.command()
def versions(
    as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False,
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
) -> None:
    """The warehouse versions: logic, parent, units, events, which one is current."""
    rows = _ask(data_dir, url, lambda c: c.versions())
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    console.print(_versions_table(rows))


def _versions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="warehouse versions")
    for name in ("version", "current", "logic", "parent", "created", "units", "events", "note"):
        table.add_column(name, justify="right" if name in ("units", "events") else "left")
    for v in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["created_ms"] / 1000))
        table.add_row(
            str(v["version"]),
            "*" if v["current"] else "",
            v["logic"],
            "" if v["parent"] is None else str(v["parent"]),
            created,
            str(v["units"]),
            str(v["events"]),
            v["note"],
        )
    return table


@app.command()
def query(
    site: Annotated[str, typer.Argument(help="The site, e.g. example.com")],
    start: Annotated[str, typer.Option(help="Inclusive start (ISO-8601, date, epoch ms).")],
    end: Annotated[str, typer.Option(help="Exclusive end (ISO-8601, date, epoch ms).")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    interval: Annotated[str, typer.Option(help="minute, hour or day.")] = "minute",
    tz: Annotated[str, typer.Option(help="IANA time zone.")] = "UTC",
    format: Annotated[str, typer.Option(help="table, json or csv.")] = "table",
) -> None:
    """A site's traffic series."""
    if format not in ("table", "json", "csv"):
        _fail("--format must be one of table, json, csv")
    params = {"start": start, "end": end, "interval": interval, "tz": tz}
    with _client(data_dir, url) as client:
        try:
            if format == "csv":
                sys.stdout.write(client.traffic_text(site, format="csv", **params))
                return
            body = client.traffic(site, **params)
        except (ApiError, OSError) as exc:
            _fail(str(exc))
            return
    if format == "json":
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"{body['site']} per {interval} ({tz})")
    table.add_column("t")
    table.add_column("count", justify="right")
    table.add_column("provisional")
    for p in body["points"]:
        table.add_row(p["t"], str(p["count"]), "yes" if p["provisional"] else "")
    console.print(table)
    total = sum(p["count"] for p in body["points"])
    console.print(f"total {total}; final up to {body['watermark']}")


@app.command()
def demo(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    url: Url = None,
    sites: Annotated[int, typer.Option(help="Demo sites (demo-N.example).")] = 20,
    hours: Annotated[int, typer.Option(help="Hours of traffic, ending now.")] = 6,
    events: Annotated[int, typer.Option(help="Events in all.")] = 50_000,
    seed: Annotated[
        int,
        typer.Option(help="Random seed: the same seed sends the same events, which count once."),
    ] = 1,
) -> None:
    """Send made-up traffic for a few demo sites, then show how to query it."""
    import random

    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - hours * 3_600_000
    names = [f"demo-{i}.example" for i in range(sites)]
    weights = [1.0 / (1 + i) for i in range(sites)]
    sent = 0
    with (
        _client(data_dir, url, ingest=True) as client,
        Progress(
            TextColumn("demo traffic"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            console=err,
        ) as progress,
    ):
        task = progress.add_task("demo", total=events)
        while sent < events:
            n = min(5000, events - sent)
            batch = [
                {
                    "ts": rng.randrange(start_ms, now_ms),
                    "site": rng.choices(names, weights)[0],
                    "path": f"/page/{rng.randrange(50)}",
                    "id": f"demo-{seed}-{sent + i}",
                }
                for i in range(n)
            ]
            try:
                client.send_events(batch)
            except (ApiError, OSError) as exc:
                _fail(str(exc))
            sent += n
            progress.update(task, completed=sent)
    console.print(f"sent {sent} events for {sites} sites over the last {hours} hours. Try:")
    console.print(
        f"  flowray process --all && flowray query {names[0]} "
        f"--start {time.strftime('%Y-%m-%dT%H:00:00Z', time.gmtime(start_ms / 1000))} "
        f"--end {time.strftime('%Y-%m-%dT%H:%M:00Z', time.gmtime(now_ms / 1000 + 60))}"
        " --interval hour"
    )


token_app = typer.Typer(
    help="Scoped access tokens, kept hashed in DATA_DIR/tokens.sqlite (no cluster needed).",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    scope: Annotated[str, typer.Option(help="ingest, read or admin.")],
    site: Annotated[
        list[str] | None,
        typer.Option(help="A site the token covers; repeat for more. Needed unless admin."),
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Requests/s allowed per API process (bursts of 2 s).")
    ] = None,
    name: Annotated[str, typer.Option(help="A note saying who or what uses it.")] = "",
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
) -> None:
    """Create a token and print it once (only its hash is kept), with its id."""
    from flowray.api.auth import StoreUnavailable, TokenStore

    settings = Settings.from_env(data_dir=data_dir)
    store = TokenStore(settings.tokens_file)
    try:
        was_open = not store.active() and not os.environ.get("FLOWRAY_ADMIN_TOKEN")
        token, record = store.create(scope, site or [], rate, name)
    except (ValueError, StoreUnavailable) as exc:
        _fail(str(exc))
        return
    sites = ", ".join(sorted(record.sites)) or "every site"
    limit = f", {record.rate_per_s:g} requests/s" if record.rate_per_s else ""
    err.print(f"created token {record.id} ({record.scope} for {sites}{limit}); it is shown once:")
    typer.echo(token)
    if was_open and settings.auth == "auto":
        err.print(
            "[yellow]note:[/yellow] this cluster's API now demands tokens (auth=auto) on every "
            "route but /healthz, /metrics, /docs and / within 2 s"
        )


@token_app.command("list")
def token_list(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List tokens (ids, scopes, sites; never the tokens themselves)."""
    from flowray.api.auth import StoreUnavailable, TokenStore

    try:
        records = TokenStore(Settings.from_env(data_dir=data_dir).tokens_file).records()
    except StoreUnavailable as exc:
        _fail(str(exc))
        return
    if as_json:
        sys.stdout.write(orjson.dumps([r.public() for r in records]).decode() + "\n")
        return
    table = Table(title=f"flowray tokens in {data_dir}")
    for col in ("id", "scope", "sites", "rate/s", "name", "created", "state"):
        table.add_column(col)
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r.created_ms / 1000))
        table.add_row(
            r.id,
            r.scope,
            ", ".join(sorted(r.sites)) or "*",
            f"{r.rate_per_s:g}" if r.rate_per_s else "-",
            r.name,
            created,
            "revoked" if r.revoked else "active",
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The id 'token list' shows.")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
) -> None:
    """Revoke a token: every API process refuses it within a few seconds."""
    from flowray.api.auth import StoreUnavailable, TokenStore

    try:
        record = TokenStore(Settings.from_env(data_dir=data_dir).tokens_file).revoke(token_id)
    except StoreUnavailable as exc:
        _fail(str(exc))
        return
    if record is None:
        _fail(f"no token with id {token_id!r} in {data_dir} (see 'flowray token list')")
        return
    console.print(f"token {record.id} ({record.scope}, {record.name or 'no name'}) is revoked")


BENCHMARKS = ("ingest", "query", "freshness", "process", "memory", "soak", "cpu")


@app.command()
def bench(
    which: Annotated[
        str, typer.Argument(help="ingest, query, freshness, process, memory, soak or cpu.")
    ],
    args: Annotated[
        list[str] | None, typer.Argument(help="Passed to the script, after --.")
    ] = None,
) -> None:
    """Run a benchmark script from scripts/ (a source checkout); see BENCHMARKS.md."""
    if which not in BENCHMARKS:
        _fail(f"benchmark must be one of {', '.join(BENCHMARKS)}")
    script = Path(__file__).resolve().parent.parent / "scripts" / f"bench_{which}.py"
    if not script.is_file():
        _fail(f"{script} is missing: benchmarks run from a source checkout of flowray")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *(args or [])]))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
