"""The CLI's everyday habits, without a cluster: --version, choices refused at once,
global --data-dir/--url, the status tables, the query's default range, sparkline and
short table, and shell completion. Calls to a cluster are faked."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import flowray
from flowray.cli import app as cli_app
from flowray.cli import bench, cluster, common, data, tokens
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
NOW_MS = 1_584_170_439_595  # 2020-03-14T07:20:39.595Z
DAY_MS = 86_400_000

SAMPLE_STATUS: dict[str, Any] = {
    "groups": [
        {
            "group": 0,
            "replicas": [
                {
                    "group": 0,
                    "replica": 0,
                    "role": "master",
                    "term": 3,
                    "abstaining": False,
                    "last_index": 120,
                    "commit_index": 118,
                    "pid": 4242,
                    "node": "a1b2c3d4e5f6a7b8c9d0e1f2",
                    "host": "box-1",
                    "late_events": 2,
                    "sealed_pending": 1,
                    "blocks_open": 2,
                    "blocks_sealed": 5,
                },
                {
                    "group": 0,
                    "replica": 1,
                    "role": "follower",
                    "term": 3,
                    "abstaining": True,
                    "last_index": 117,
                    "commit_index": 117,
                    "pid": 4243,
                    "node": "ffffeeeeddddccccbbbb",
                    "host": "box-[bold]2",
                    "late_events": 0,
                    "sealed_pending": None,
                    "blocks_open": 2,
                    "blocks_sealed": 5,
                },
                {"status": "down", "error": "GetTimeoutError: no answer", "group": 0, "replica": 2},
            ],
        }
    ],
    "processor": {
        "pid": 777,
        "jobs": 4,
        "republished_units": 1,
        "merged_days": 0,
        "last_job": {"blocks": 3, "units": 4, "events": 1234, "seconds": 0.5},
        "last_error": None,
        "catalog": {
            "generation": 9,
            "current_version": 1,
            "units": 40,
            "events": 99_999,
            "watermark_ms": 1_584_172_800_000,
        },
        "cursors": {"0": 118},
        "versions": [
            {
                "version": 1,
                "logic": "default",
                "modules": [],
                "parent": None,
                "created_ms": 1_584_172_800_000,
                "note": "",
                "current": True,
                "units": 40,
                "events": 99_999,
            }
        ],
        "shard_owners": [0, 0],
        "jobs_running": [{"kind": "reprocess", "job": "j1", "done": 1, "total": 3}],
    },
    "layout": {"groups": 1, "replicas": 3, "shards": 2},
    "cache": "redis",
}


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("FLOWRAY_DATA_DIR", "FLOWRAY_URL", "FLOWRAY_TOKEN", "FLOWRAY_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def _text(*parts: Any, width: int = 160) -> str:
    out = Console(width=width, record=True, file=io.StringIO())
    for part in parts:
        out.print(part)
    return out.export_text()


# ----------------------------------------------------------------------------- version


def test_version_prints_the_package_version(runner: CliRunner) -> None:
    result = runner.invoke(cli_app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"flowray {flowray.__version__}\n"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == flowray.__version__, "pyproject.toml and flowray.__version__"


# ----------------------------------------------------------------------------- choices


@pytest.mark.parametrize(
    ("args", "name", "choices"),
    [
        (
            ["query", "a.example", "--interval", "year"],
            "--interval",
            ["minute", "hour", "day", "week", "month"],
        ),
        (["query", "a.example", "--format", "yaml"], "--format", ["table", "json", "csv"]),
        (["ingest", "nowhere.log", "--format", "xml"], "--format", ["auto", "seed", "ndjson"]),
        (["token", "create", "--scope", "root"], "--scope", ["ingest", "read", "admin"]),
        (["bench", "nonsense"], "which", ["ingest", "freshness", "soak", "cpu"]),
    ],
)
def test_a_bad_choice_fails_at_once_listing_the_choices(
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    name: str,
    choices: list[str],
) -> None:
    def no_cluster(*_: Any, **__: Any) -> None:
        raise AssertionError("a bad choice must fail before any call to a cluster")

    monkeypatch.setattr(data, "client_for", no_cluster)
    result = runner.invoke(cli_app, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{name}'" in result.output
    assert "is not one of" in result.output
    for value in choices:
        assert f"'{value}'" in result.output


def test_the_choices_are_the_servers() -> None:
    """The CLI writes its choices out (to start without numpy and pyarrow): they must
    stay those the server, the parsers and the token store accept."""
    from flowray.api.auth import SCOPES
    from flowray.ingest.events import FORMATS
    from flowray.query.series import INTERVALS

    assert tuple(common.Interval) == INTERVALS
    assert tuple(common.IngestFormat) == FORMATS
    assert tuple(tokens.Scope) == SCOPES
    scripts = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "scripts").glob("bench_*.py"))
    assert sorted(bench.BENCHMARKS) == scripts


def test_starting_the_cli_loads_neither_numpy_nor_pyarrow() -> None:
    import subprocess

    code = "import sys, flowray.cli; print('numpy' in sys.modules, 'pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------- global options


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str | None]]:
    """'status' answered with SAMPLE_STATUS; the (data_dir, url) it was asked with."""
    calls: list[tuple[Path, str | None]] = []

    def fake_ask(data_dir: Path, url: str | None, call: Any) -> Any:
        calls.append((data_dir, url))
        return json.loads(json.dumps(SAMPLE_STATUS))

    monkeypatch.setattr(cluster, "ask", fake_ask)
    return calls


@pytest.mark.parametrize(
    ("args", "env", "data_dir", "url"),
    [
        (["status"], {}, "flowray-data", None),
        (["--data-dir", "/g", "status"], {}, "/g", None),
        (["status", "--data-dir", "/c"], {}, "/c", None),
        (["--data-dir", "/g", "status", "--data-dir", "/c"], {}, "/c", None),
        (["status"], {"FLOWRAY_DATA_DIR": "/e"}, "/e", None),
        (["--data-dir", "/g", "status"], {"FLOWRAY_DATA_DIR": "/e"}, "/g", None),
        (["--url", "http://g:1", "status"], {}, "flowray-data", "http://g:1"),
        (["status", "--url", "http://c:1"], {}, "flowray-data", "http://c:1"),
        (
            ["--url", "http://g:1", "status", "--url", "http://c:1"],
            {},
            "flowray-data",
            "http://c:1",
        ),
        (["status"], {"FLOWRAY_URL": "http://e:1"}, "flowray-data", "http://e:1"),
        (
            ["--url", "http://g:1", "status"],
            {"FLOWRAY_URL": "http://e:1"},
            "flowray-data",
            "http://g:1",
        ),
    ],
)
def test_data_dir_and_url_before_or_after_the_command(
    runner: CliRunner,
    asked: list[tuple[Path, str | None]],
    args: list[str],
    env: dict[str, str],
    data_dir: str,
    url: str | None,
) -> None:
    """The command's own option wins, then the one before the command, then the
    environment, then the default."""
    result = runner.invoke(cli_app, args, env=env)
    assert result.exit_code == 0, result.output
    assert asked == [(Path(data_dir), url)]


def test_global_data_dir_reaches_a_subgroup(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli_app, ["--data-dir", str(tmp_path), "token", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    made = runner.invoke(
        cli_app, ["--data-dir", str(tmp_path), "token", "create", "--scope", "admin"]
    )
    assert made.exit_code == 0, made.output
    assert (tmp_path / "tokens.sqlite").exists()


def test_global_data_dir_names_the_missing_cluster(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli_app, ["--data-dir", str(tmp_path / "none"), "status"])
    assert result.exit_code == 1
    assert "no running cluster" in result.stderr and "none" in result.stderr


def test_a_refused_connection_is_a_message_not_a_traceback(runner: CliRunner) -> None:
    result = runner.invoke(cli_app, ["--url", f"http://127.0.0.1:{free_port()}", "status"])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "Traceback" not in result.output


# ----------------------------------------------------------------------------- status


def test_status_tables() -> None:
    text = _text(*cluster.status_view(SAMPLE_STATUS))
    for expected in (
        "master",
        "follower (abstaining)",
        "down",
        "118/120",  # commit/last
        "4242",
        "box-1",
        "box-[bold]2",  # data, not markup
        "1 groups x 3 replicas, 2 shards",
        "3 blocks -> 4 units, 1234 events in 0.5 s",
        "reprocess j1 (1/3)",
        "2020-03-14 08:00:00Z",  # final up to
        "0->g0, 1->g0",
        "warehouse versions",
        "group 0 replica 2: GetTimeoutError: no answer",
    ):
        assert expected in text, expected
    assert "a1b2c3d4e5f6" in text and "a1b2c3d4e5f6a7" not in text  # node ids shortened
    sealed = next(line for line in text.splitlines() if "not yet published" in line)
    late = next(line for line in text.splitlines() if "late events (since" in line)
    assert "1" in sealed and "2" in late  # counted by the masters only
    assert "{'" not in text, "no raw Python dicts"


def test_status_of_a_processor_that_did_not_answer() -> None:
    body = dict(SAMPLE_STATUS, processor={"status": "down", "error": "ActorDiedError: gone"})
    text = _text(*cluster.status_view(body))
    assert "processor: ActorDiedError: gone" in text
    assert "down" in text


def test_status_command_prints_tables_or_the_raw_answer(
    runner: CliRunner, asked: list[tuple[Path, str | None]]
) -> None:
    human = runner.invoke(cli_app, ["status"])
    assert human.exit_code == 0, human.output
    assert "groups" in human.stdout and "processor" in human.stdout and "master" in human.stdout
    raw = runner.invoke(cli_app, ["status", "--json"])
    assert raw.exit_code == 0, raw.output
    assert json.loads(raw.stdout) == SAMPLE_STATUS


# ------------------------------------------------------------------------------ query


def test_query_range_defaults_to_the_last_24_hours() -> None:
    start, end = data.query_range(None, None, "UTC", NOW_MS)
    # To the end of the current minute (07:21:00), so the newest minute is in.
    assert int(end) == 1_584_170_460_000
    assert int(end) - int(start) == DAY_MS
    on_the_minute = 1_584_170_400_000
    assert data.query_range(None, None, "UTC", on_the_minute) == (
        str(on_the_minute - DAY_MS),
        str(on_the_minute),
    )


def test_query_range_from_one_bound() -> None:
    march_15_utc = 1_584_230_400_000
    assert data.query_range(None, "2020-03-15", "UTC", NOW_MS) == (
        str(march_15_utc - DAY_MS),
        "2020-03-15",
    )
    # A date is midnight in the query's zone, as the server reads it.
    paris = data.query_range(None, "2020-03-15", "Europe/Paris", NOW_MS)
    assert paris == (str(march_15_utc - 3_600_000 - DAY_MS), "2020-03-15")
    assert data.query_range("2020-03-14T00:00:00Z", None, "UTC", NOW_MS) == (
        "2020-03-14T00:00:00Z",
        str(march_15_utc),
    )
    assert data.query_range(str(NOW_MS), None, "UTC", 0) == (str(NOW_MS), str(NOW_MS + DAY_MS))
    # Both given: sent as typed; the server judges them.
    assert data.query_range("a", "b", "UTC", NOW_MS) == ("a", "b")
    with pytest.raises(ValueError, match="invalid time"):
        data.query_range(None, "yesterday", "UTC", NOW_MS)
    with pytest.raises(ValueError, match="time zone"):
        data.query_range("2020-03-14", None, "Mars/Olympus", NOW_MS)


def test_sparkline() -> None:
    assert data.sparkline(list(range(9)), 20) == " ▁▂▃▄▅▆▇█"
    assert data.sparkline([0, 0, 0], 10) == "   "
    assert data.sparkline([1, 1000], 10) == "▁█"  # any traffic shows
    assert data.sparkline([1, 1, 9, 9], 2) == "▁█"  # runs of values, by their mean
    assert data.sparkline([], 10) == ""
    long = data.sparkline([i % 60 for i in range(44_640)], 80)
    assert 0 < len(long) <= 80
    assert data.spark_run(44_640, 80) == 558 and data.spark_run(5, 80) == 1


def _points(n: int) -> list[dict[str, Any]]:
    return [{"t": f"t{i:05d}", "count": i % 7, "provisional": i == n - 1} for i in range(n)]


def test_a_long_table_shows_its_first_and_last_rows() -> None:
    body = {"site": "a.example", "points": _points(1440), "watermark": "t01439"}
    out = Console(width=100, record=True, file=io.StringIO())
    data.print_series(out, body, "minute", "UTC", all_rows=False)
    text = out.export_text()
    lines = text.splitlines()
    assert set(lines[0].strip()) <= set(data.SPARK_BARS) and lines[0].strip()
    assert "each mark 15 minutes" in text
    assert "t00000" in text and "t00009" in text and "t00010" not in text
    assert "t01430" in text and "t01439" in text and "t01429" not in text
    assert "1420 of 1440 rows left out (--all prints them)" in text
    assert f"total {sum(p['count'] for p in body['points'])}" in text


def test_all_prints_every_row() -> None:
    body = {"site": "a.example", "points": _points(100), "watermark": None}
    text = _text_of_series(body, all_rows=True)
    assert all(f"t{i:05d}" in text for i in range(100)) and "left out" not in text
    short = _text_of_series({**body, "points": _points(30)}, all_rows=False)
    assert "t00015" in short and "left out" not in short
    empty = _text_of_series({**body, "points": [dict(p, count=0) for p in _points(3)]})
    assert "no events in this range" in empty


def _text_of_series(body: dict[str, Any], all_rows: bool = False) -> str:
    out = Console(width=100, record=True, file=io.StringIO())
    data.print_series(out, body, "minute", "UTC", all_rows)
    return out.export_text()


class FakeClient:
    def __init__(self) -> None:
        self.params: list[dict[str, Any]] = []

    def traffic(self, site: str, **params: Any) -> dict[str, Any]:
        self.params.append(params)
        return {"site": site, "points": _points(1440), "watermark": None}


def test_query_without_a_range_asks_for_the_last_day(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeClient()

    @contextlib.contextmanager
    def client_for(*_: Any, **__: Any) -> Iterator[FakeClient]:
        yield fake

    monkeypatch.setattr(data, "client_for", client_for)
    result = runner.invoke(cli_app, ["query", "a.example"])
    assert result.exit_code == 0, result.output
    (params,) = fake.params
    assert int(params["end"]) - int(params["start"]) == DAY_MS
    assert params["interval"] == "minute" and params["tz"] == "UTC"
    assert "rows left out" in result.stdout
    whole = runner.invoke(cli_app, ["query", "a.example", "--end", "2020-03-15", "--all"])
    assert whole.exit_code == 0, whole.output
    assert fake.params[1]["start"] == str(1_584_230_400_000 - DAY_MS)
    assert "t00700" in whole.stdout and "left out" not in whole.stdout


# ------------------------------------------------------------------------- completion


def test_completion_options_are_offered(runner: CliRunner) -> None:
    result = runner.invoke(cli_app, ["--help"])
    assert result.exit_code == 0, result.output
    for option in ("--install-completion", "--show-completion", "--version", "--data-dir"):
        assert option in result.stdout, option
