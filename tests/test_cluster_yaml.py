"""The cluster-launcher files are valid Ray cluster configs and start flowray right.

Validation is offline: Ray's own ``prepare_config`` (defaults, the local provider's node
type, per-type worker bounds) and ``validate_config`` (ray-schema.json plus Ray's
cross-field checks), the same two steps ``ray up`` runs before it contacts any cloud.
The provider's ``bootstrap_config`` (which calls AWS) is never called.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from click import ClickException
from ray.autoscaler._private.util import prepare_config, validate_config

from flowray.cluster.control import MALLOC_ENV

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "cluster.yaml"
LOCAL = ROOT / "deploy" / "cluster-local.yaml"
FILES = [AWS, LOCAL]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
REDIS_PORT = 6379

# What flowray's files must say themselves (Ray fills defaults for most of these, so a
# misspelled key would otherwise silently fall back to Ray's default).
REQUIRED = {
    "cluster_name",
    "max_workers",
    "provider",
    "auth",
    "file_mounts",
    "setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
}
REQUIRED_AWS = REQUIRED | {"available_node_types", "head_node_type"}
REQUIRED_AWS_PROVIDER = {"type", "region", "availability_zone", "cache_stopped_nodes"}
REQUIRED_LOCAL_PROVIDER = {"type", "head_ip", "worker_ips"}


def load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path} is not a mapping"
    return config


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does to a config before any provider call; returns the result."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def check(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's validation plus flowray's own required keys."""
    is_local = config.get("provider", {}).get("type") == "local"
    missing = (REQUIRED if is_local else REQUIRED_AWS) - set(config)
    assert not missing, f"missing top-level keys: {sorted(missing)}"
    wanted = REQUIRED_LOCAL_PROVIDER if is_local else REQUIRED_AWS_PROVIDER
    missing = wanted - set(config["provider"])
    assert not missing, f"missing provider keys: {sorted(missing)}"
    assert config["auth"].get("ssh_user"), "auth.ssh_user is required"
    return ray_validate(config)


def ray_start(commands: list[str], head: bool) -> list[str]:
    """The argv of the single ``ray start`` in a list of commands."""
    found = []
    for command in commands:
        for part in command.split(";"):
            argv = shlex.split(part)
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                argv = argv[1:]  # the command's environment, as the shell reads it
            if argv[:2] == ["ray", "start"] and ("--head" in argv) == head:
                found.append(argv)
    assert len(found) == 1, f"expected one 'ray start{' --head' if head else ''}': {commands}"
    return found[0]


def option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_is_a_valid_ray_cluster_config(path: Path) -> None:
    config = load(path)
    # The raw file against Ray's schema too: nothing misspelled before defaults merge in.
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = check(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _at(config: dict[str, Any], where: list[str]) -> dict[str, Any]:
    node = config
    for key in where:
        node = node[key]
    return node


def rename(where: list[str], old: str, new: str) -> Any:
    """A mutation: the key ``old`` of the mapping at ``where`` becomes ``new``."""
    return lambda c: _at(c, where).__setitem__(new, _at(c, where).pop(old))


def drop(where: list[str], key: str) -> Any:
    return lambda c: _at(c, where).pop(key)


def put(where: list[str], key: str, value: Any) -> Any:
    return lambda c: _at(c, where).__setitem__(key, value)


WORKER = ["available_node_types", "flowray.worker"]
HEAD = ["available_node_types", "flowray.head"]
BROKEN = {
    # id: (file, mutation, whether Ray's own validation already refuses it)
    "aws-top-level-typo": (
        AWS,
        rename([], "head_start_ray_commands", "head_start_ray_comands"),
        True,
    ),
    "aws-max-workers-typo": (AWS, rename([], "max_workers", "max_worker"), True),
    "aws-head-type-unknown": (AWS, put([], "head_node_type", "flowray.haed"), True),
    "aws-no-node-types": (AWS, drop([], "available_node_types"), True),
    "aws-resources-typo": (AWS, rename(WORKER, "resources", "resouces"), True),
    "aws-no-node-config": (AWS, drop(HEAD, "node_config"), True),
    "aws-auth-key-typo": (AWS, rename(["auth"], "ssh_user", "ssh_usr"), True),
    "aws-max-below-min": (AWS, put([], "max_workers", 1), True),
    # Ray's schema lets providers take any key, so only flowray's check sees this one.
    "aws-provider-key-typo": (
        AWS,
        rename(["provider"], "availability_zone", "availability_zon"),
        False,
    ),
    "local-top-level-typo": (
        LOCAL,
        rename([], "worker_start_ray_commands", "worker_start_ray_command"),
        True,
    ),
    "local-setup-typo": (LOCAL, rename([], "setup_commands", "setup_comands"), True),
    "local-provider-key-typo": (LOCAL, rename(["provider"], "worker_ips", "workers_ips"), True),
}
REJECTED = (jsonschema.ValidationError, ValueError, AssertionError, KeyError, ClickException)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_is_rejected(case: str) -> None:
    path, mutate, ray_rejects = BROKEN[case]
    config = load(path)
    check(copy.deepcopy(config))  # the file itself passes
    mutate(config)
    with pytest.raises(REJECTED):
        check(copy.deepcopy(config))
    if ray_rejects:
        with pytest.raises(REJECTED):
            ray_validate(config)


def test_ray_schema_alone_rejects_a_misspelled_key() -> None:
    """Ray's validate_config (not just flowray's checks) refuses unknown keys."""
    config = ray_validate(load(AWS))
    config["setup_comands"] = config["setup_commands"]
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validate_config(config)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_listens_on_a_port_other_than_redis(path: Path) -> None:
    config = load(path)
    head = ray_start(config["head_start_ray_commands"], head=True)
    port = option(head, "--port")
    assert port is not None, "ray start --head must name --port (Ray's default is 6379)"
    assert int(port) != REDIS_PORT
    worker = ray_start(config["worker_start_ray_commands"], head=False)
    assert option(worker, "--address") == f"$RAY_HEAD_IP:{port}"
    assert option(head, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_starts_with_the_fixed_malloc_thresholds(path: Path) -> None:
    """Every Ray process on a node gets what a local cluster gets (cluster.MALLOC_ENV)."""
    config = load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        line = next(c for c in config[key] if "ray start" in c)
        start = line[: line.index("ray start")]
        for name, value in MALLOC_ENV.items():
            assert f"{name}={value} " in start, (key, line)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_binds_loopback(path: Path) -> None:
    head = ray_start(load(path)["head_start_ray_commands"], head=True)
    assert option(head, "--dashboard-host") == "127.0.0.1"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_head_brings_flowray_up_joining_ray(path: Path) -> None:
    commands = load(path)["head_start_ray_commands"]
    starts = [i for i, c in enumerate(commands) if "ray start --head" in c]
    ups = [i for i, c in enumerate(commands) if re.search(r"\bflowray up\b", c)]
    assert len(starts) == 1 and len(ups) == 1, commands
    assert ups[0] > starts[0], "flowray up must run after Ray is started"
    up = commands[ups[0]]
    assert re.search(r"\bRAY_ADDRESS=\S+ .*flowray up\b", up), up
    argv = shlex.split(up.split(";")[-1])
    argv = argv[argv.index("flowray") :]
    assert "--detach" in argv
    data_dir = option(argv, "--data-dir")
    assert data_dir and data_dir.startswith("/"), "the data dir must be an absolute path"
    # Every node gets the data dir and the shared warehouse behind it.
    setup = "\n".join(load(path)["setup_commands"])
    assert f"mkdir -p {data_dir}" in setup
    assert f"{data_dir}/warehouse" in setup


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_setup_installs_flowray_from_the_shipped_repo(path: Path) -> None:
    config = load(path)
    assert config["file_mounts"] == {"/home/ubuntu/flowray": "."}
    assert any("pip install -e /home/ubuntu/flowray" in c for c in config["setup_commands"])


def test_every_node_type_has_resources() -> None:
    config = load(AWS)
    head_cpus = option(ray_start(config["head_start_ray_commands"], head=True), "--num-cpus")
    worker_cpus = option(ray_start(config["worker_start_ray_commands"], head=False), "--num-cpus")
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources")
        assert resources and resources.get("CPU", 0) > 0, f"{name} has no CPU resources"
        announced = head_cpus if name == config["head_node_type"] else worker_cpus
        assert announced is not None and int(announced) == resources["CPU"], name
    # The local provider builds its node type itself; Ray detects its resources.
    prepared = ray_validate(load(LOCAL))
    assert all("resources" in t for t in prepared["available_node_types"].values())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_docs_document_every_top_level_key(path: Path) -> None:
    section = OPERATIONS.split("## Deploying on a cluster", 1)
    assert len(section) == 2, "docs/operations.md has no 'Deploying on a cluster' section"
    missing = [key for key in load(path) if f"`{key}`" not in section[1]]
    assert not missing, f"docs/operations.md does not document {path.name} keys: {missing}"
