"""deploy/serve.yaml, the alternative to `flowray up`: valid for Serve's own schema, its
import path and args make a flowray, and the builder really brings one up (and a
second build finds the running actors instead of making new ones)."""

from __future__ import annotations

import importlib
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from flowray.actors.names import actor_name
from flowray.cluster import control as cluster
from flowray.cluster.builder import build_flowray, settings_from_args
from flowray.serve.deployment import APP_NAME
from tests.helpers import cluster_settings, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "serve.yaml"


def test_the_config_is_valid_for_serve() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application,) = config.applications
    assert application.name == "flowray" and application.route_prefix == "/"
    module, _, name = application.import_path.partition(":")
    assert getattr(importlib.import_module(module), name) is build_flowray
    assert config.http_options.host == "127.0.0.1"
    settings = settings_from_args(application.args)
    assert (settings.groups, settings.replicas, settings.shards) == (2, 3, 8)
    assert settings.wait_nodes == 3 and str(settings.data_dir) == "/mnt/flowray"


def test_unknown_or_bad_args_are_refused() -> None:
    with pytest.raises(ValueError, match="bad flowray args"):
        settings_from_args({"groupz": 2})
    with pytest.raises(ValueError, match="odd number"):
        settings_from_args({"replicas": 2})


def test_the_builder_brings_up_a_working_flowray(
    ray_session: None, redis_url: str, serve_port: int, tmp_path: Path
) -> None:
    # Every setting can be an arg: a test cluster's settings, as a config file's args.
    args = cluster_settings(
        tmp_path / "data", serve_port, redis_url, "flowray-serve-config"
    ).to_json()
    settings = settings_from_args(args)
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    try:
        serve.run(build_flowray(args), name=APP_NAME, route_prefix="/")
        first = ray.get_actor(actor_name(0, 0), namespace=settings.namespace)
        # A redeploy runs the builder again: it finds the running actors.
        serve.run(build_flowray(args), name=APP_NAME, route_prefix="/")
        again = ray.get_actor(actor_name(0, 0), namespace=settings.namespace)
        assert first._actor_id == again._actor_id
        url = f"http://127.0.0.1:{serve_port}"
        wait_healthy(url)
        events = [{"ts": 1_584_170_439_595, "site": "taobao.com", "id": f"e{i}"} for i in range(5)]
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/events", json=events + events[:2]).json() == {"accepted": 7}
            gateway = f"http://127.0.0.1:{args['ingest_port']}"
            assert httpx.get(f"{gateway}/healthz", timeout=10).status_code == 200
            assert client.post("/v1/admin/process", params={"mode": "closed"}).json()["events"]
            body = client.get(
                "/v1/sites/taobao.com/traffic",
                params={"start": "2020-03-14T07:00:00Z", "end": "2020-03-14T08:00:00Z"},
            ).json()
            assert body["total"] == 5
    finally:
        serve.delete(APP_NAME)
        ended = cluster.stop_named(settings)
    assert actor_name(0, 0) in ended and "flowray-processor" in ended
    with pytest.raises(ValueError):
        ray.get_actor(actor_name(0, 0), namespace=settings.namespace)
