"""``flowray query`` with the insight flags (--metrics, --by, --filter, --compare),
without a cluster: the calls go to a fake client that records them and answers in the
shape of the /v1 insight routes; the client's own methods are checked against a mock
transport. Without the new flags the command is the plain series, as before."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from flowray.cli import app as cli_app
from flowray.cli import data
from flowray.client import Client

SITE = "a.example"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("FLOWRAY_DATA_DIR", "FLOWRAY_URL", "FLOWRAY_TOKEN", "FLOWRAY_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def test_the_choices_are_the_servers() -> None:
    """Written out (to start without pyarrow), they must stay the server's."""
    from flowray.query.insights import DIMENSIONS, METRICS, OPS

    assert tuple(data.Dimension) == DIMENSIONS
    assert data.QUERY_METRICS == METRICS
    assert data.FILTER_OPS == OPS


class FakeClient:
    """Records each call; answers as the insight routes do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def traffic(self, site: str, **params: Any) -> dict[str, Any]:
        self.calls.append(("traffic", params))
        points = [{"t": f"t{i}", "count": i, "provisional": False} for i in range(3)]
        return {"site": site, "points": points, "watermark": None}

    def timeseries(self, site: str, **params: Any) -> dict[str, Any]:
        self.calls.append(("timeseries", params))
        metrics = params["metrics"].split(",")
        points = [
            {"t": f"2020-03-14T0{i}:00:00+00:00", **{m: 10 * i + 1 for m in metrics}}
            | {"provisional": i == 2}
            for i in range(3)
        ]
        return {"site": site, "interval": params["interval"], "tz": params["tz"],
                "metrics": metrics, "points": points, "totals": {}, "watermark": None}  # fmt: skip

    def totals(self, site: str, **params: Any) -> dict[str, Any]:
        self.calls.append(("totals", params))
        return {
            "site": site,
            "tz": params["tz"],
            "metrics": {"visitors": 30, "pageviews": 90, "events": 4},
            "previous": {"visitors": 20, "pageviews": 90, "events": 0},
            "change": {"visitors": 50.0, "pageviews": 0.0, "events": None},
            "provisional": True,
        }

    def breakdown(self, site: str, **params: Any) -> dict[str, Any]:
        self.calls.append(("breakdown", params))
        results = [
            {"value": "google.com", "visitors": 7, "pageviews": 9, "events": 1},
            {"value": 'a "quoted", value', "visitors": 2, "pageviews": 2, "events": 0},
        ]
        return {"site": site, "by": params["by"], "page": 1, "limit": 10,
                "results": results, "has_more": True, "provisional": False}  # fmt: skip


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()

    @contextlib.contextmanager
    def client_for(*_: Any, **__: Any) -> Iterator[FakeClient]:
        yield client

    monkeypatch.setattr(data, "client_for", client_for)
    return client


RANGE = ["--start", "2020-03-14", "--end", "2020-03-15"]


def test_without_the_new_flags_the_plain_series(runner: CliRunner, fake: FakeClient) -> None:
    result = runner.invoke(cli_app, ["query", SITE, *RANGE])
    assert result.exit_code == 0, result.output
    assert [name for name, _ in fake.calls] == ["traffic"]
    assert fake.calls[0][1] == {
        "start": "2020-03-14",
        "end": "2020-03-15",
        "interval": "minute",
        "tz": "UTC",
    }


def test_by_asks_for_a_breakdown(runner: CliRunner, fake: FakeClient) -> None:
    args = ["query", SITE, *RANGE, "--by", "source", "--metrics", "visitors,pageviews"]
    args += ["--filter", "browser:is:Firefox|Chrome", "--filter", "path:contains:/blog"]
    result = runner.invoke(cli_app, [*args, "--tz", "Europe/Paris"])
    assert result.exit_code == 0, result.output
    assert fake.calls == [
        (
            "breakdown",
            {
                "by": "source",
                "start": "2020-03-14",
                "end": "2020-03-15",
                "tz": "Europe/Paris",
                "metrics": "visitors,pageviews",
                "filter": ["browser:is:Firefox|Chrome", "path:contains:/blog"],
            },
        )
    ]
    out = result.stdout
    assert "a.example by source (Europe/Paris)" in out
    assert "google.com" in out and "visitors" in out and "pageviews" in out
    assert "events" not in out.split("more values")[0].split("(Europe/Paris)")[1]
    assert "more values follow" in out


def test_by_as_json_and_csv(runner: CliRunner, fake: FakeClient) -> None:
    raw = runner.invoke(cli_app, ["query", SITE, *RANGE, "--by", "source", "--format", "json"])
    assert raw.exit_code == 0, raw.output
    assert json.loads(raw.stdout)["results"][0]["value"] == "google.com"
    csv = runner.invoke(cli_app, ["query", SITE, *RANGE, "--by", "source", "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    assert csv.stdout.splitlines() == [
        "source,visitors,pageviews,events",
        "google.com,7,9,1",
        '"a ""quoted"", value",2,2,0',
    ]


def test_compare_shows_totals_beside_the_previous_period(
    runner: CliRunner, fake: FakeClient
) -> None:
    result = runner.invoke(cli_app, ["query", SITE, *RANGE, "--compare"])
    assert result.exit_code == 0, result.output
    ((name, params),) = fake.calls
    assert name == "totals" and params["compare"] == "previous_period"
    assert params["metrics"] == "visitors,pageviews,events" and params["filter"] == []
    lines = result.stdout.splitlines()
    visitors = next(line for line in lines if "visitors" in line)
    assert "30" in visitors and "20" in visitors and "+50.0%" in visitors
    events = next(line for line in lines if "events" in line)
    assert "%" not in events  # no change from zero
    assert "not processed yet" in result.stdout


def test_metrics_alone_asks_for_a_series(runner: CliRunner, fake: FakeClient) -> None:
    args = ["query", SITE, *RANGE, "--metrics", "pageviews", "--interval", "hour"]
    result = runner.invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    ((name, params),) = fake.calls
    assert name == "timeseries" and params["interval"] == "hour"
    assert params["metrics"] == "pageviews"
    out = result.stdout
    assert "a.example per hour (UTC)" in out and "pageviews" in out
    # The chart of the first metric (its caption may wrap).
    assert "peak 21 at 2020-03-14T02:00:00+00:00" in " ".join(out.split())
    csv = runner.invoke(cli_app, [*args, "--filter", "name:is:pageview", "--format", "csv"])
    assert csv.stdout.splitlines()[:2] == [
        "t,pageviews,provisional",
        "2020-03-14T00:00:00+00:00,1,false",
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--by", "country"], ["Invalid value for '--by'", "'path'", "'device'", "'name'"]),
        (["--metrics", "visits"], ["Invalid value for '--metrics'", "visitors, pageviews, events"]),
        (["--metrics", "visitors,visitors"], ["each once"]),
        (["--filter", "country:is:EE"], ["Invalid value for '--filter'", "country:is:EE"]),
        (["--filter", "path:matches:/a"], ["OP one of is, is_not, contains"]),
        (["--filter", "path:is"], ["is not DIM:OP:VALUE"]),
        (["--by", "source", "--compare"], ["--by and --compare do not go together"]),
    ],
)
def test_bad_flags_fail_at_once(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: list[str]
) -> None:
    def no_cluster(*_: Any, **__: Any) -> None:
        raise AssertionError("a bad flag must fail before any call to a cluster")

    monkeypatch.setattr(data, "client_for", no_cluster)
    result = runner.invoke(cli_app, ["query", SITE, *args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    for part in expected:
        assert part in text, part


def test_the_client_methods_ask_the_insight_routes() -> None:
    seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(
            (
                request.method,
                request.url.path,
                list(request.url.params.multi_items()),
                request.content,
            )
        )
        return httpx.Response(200, json={"ok": True})

    client = Client("http://t")
    client.http = httpx.Client(base_url="http://t", transport=httpx.MockTransport(answer))
    with client:
        client.timeseries(SITE, start="a", filter=["path:is:/", "os:is:Linux"])
        client.totals(SITE, compare="previous_period")
        client.breakdown(SITE, by="os", page=2)
        assert client.plausible_query({"site_id": SITE}) == {"ok": True}
    assert seen == [
        (
            "GET",
            "/v1/sites/a.example/timeseries",
            [("start", "a"), ("filter", "path:is:/"), ("filter", "os:is:Linux")],
            b"",
        ),
        ("GET", "/v1/sites/a.example/totals", [("compare", "previous_period")], b""),
        ("GET", "/v1/sites/a.example/breakdown", [("by", "os"), ("page", "2")], b""),
        ("POST", "/api/v2/query", [], b'{"site_id":"a.example"}'),
    ]
