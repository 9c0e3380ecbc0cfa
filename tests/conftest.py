"""Shared fixtures: one real Ray instance per session, real Redis, free ports.

Ray is started once, bound to loopback, and shared by every test that asks for it;
clusters started by tests live in their own Ray namespaces and are stopped by pid-free
means (named actors killed by handle), never by ``ray stop``.
"""

from __future__ import annotations

import os

# Read by Ray when it is imported: a single-node Ray then listens on loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port

REDIS_URL_ENV = "FLOWRAY_TEST_REDIS_URL"
DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379/0"


NO_REDIS = (
    f"no Redis on this machine ({REDIS_URL_ENV} is empty: scripts/test could not install "
    "redis-server without root); this test needs a real Redis"
)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Where flowray under test keeps its cache: a Redis that answers (the test command
    starts a private one when needed), or "" (flowray's in-process cache) when the
    machine has none, which the test command says by setting the variable empty."""
    from flowray.query.cache import redis_answers

    url = os.environ.get(REDIS_URL_ENV, DEFAULT_TEST_REDIS)
    if url == "":
        return ""
    if not redis_answers(url):
        pytest.fail(
            f"no Redis answers at {url}: run the suite with scripts/test, which "
            f"starts one, or set {REDIS_URL_ENV}"
        )
    return url


@pytest.fixture(scope="session")
def real_redis_url(redis_url: str) -> str:
    """A Redis that answers, for the tests of Redis itself; skipped where there is none."""
    if redis_url == "":
        pytest.skip(NO_REDIS)
    return redis_url


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join another Ray this machine runs or once ran
            num_cpus=2,
            include_dashboard=False,
            namespace="flowray-tests",
            object_store_memory=512 * 1024 * 1024,
            logging_level="WARNING",
            log_to_driver=False,
        )
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), f"Ray must bind loopback, got {address}"
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Serve's HTTP port is fixed by the first serve.start in a Ray instance: one per session."""
    return free_port()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(params=["fastapi", "gateway"])
def front(request: pytest.FixtureRequest) -> str:
    """The app's front: FastAPI's routes (as Serve runs it), or the ingest gateway's."""
    return str(request.param)
