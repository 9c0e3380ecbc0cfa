"""The ingress batcher: concurrent writes of a group merge into one proposal, every
request is answered only when its proposal commits, and the queue has a bound."""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa
import pytest

from flowray.api.app import Unavailable
from flowray.config import Settings
from flowray.core.router import shard_for_site
from flowray.ingest.events import Row, rows_table
from flowray.ingest.pieces import HOUR_MS, Routed, from_ipc, ordered
from flowray.serve import deployment


class _Link:
    """A master's wire link whose proposals commit when the gate opens."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.calls: list[Any] = []
        self.gate = gate

    async def call(self, method: str, payload: Any, timeout: float) -> int:
        assert method == "propose"
        self.calls.append(payload)
        await self.gate.wait()
        return len(self.calls)


class _Directory:
    def __init__(self, link: _Link) -> None:
        self.h = link

    async def master(self, group: int) -> tuple[int, Any]:
        return 0, None

    def link(self, group: int, replica: int) -> _Link:
        return self.h

    def forget(self, group: int, hint: int | None = None) -> None:
        pass


def _rows(n: int, site: str = "a.com") -> list[Row]:
    return [
        (1_700_000_000_000 + i, site, None, None, None, None, None, None, None) for i in range(n)
    ]


def _table(n: int, site: str = "b.com") -> Routed:
    """A parsed table's events as the app hands them over: routed, in (shard, hour) runs."""
    routed = ordered(rows_table(_rows(n, site)), Settings().shards)
    assert routed is not None
    return routed


@pytest.mark.anyio
async def test_queued_writes_merge_into_one_proposal() -> None:
    gate = asyncio.Event()
    handle = _Link(gate)
    ingress = deployment.RayIngest(Settings(), _Directory(handle))  # type: ignore[arg-type]
    first = asyncio.ensure_future(ingress.commit({0: _rows(1)}))
    await asyncio.sleep(0.01)  # the first proposal is in flight
    rest = [asyncio.ensure_future(ingress.commit({0: _rows(2)})) for _ in range(20)]
    rest.append(asyncio.ensure_future(ingress.commit({0: _table(5)})))
    await asyncio.sleep(0.01)
    assert not first.done() and not any(r.done() for r in rest), "answered before commit"
    gate.set()
    await asyncio.gather(first, *rest)
    assert len(handle.calls) == 2, "twenty-one queued writes should share one proposal"
    merged = handle.calls[1]
    shards = {shard_for_site(site, Settings().shards): site for site in ("a.com", "b.com")}
    assert len(merged) == len(shards), "one piece per (shard, hour)"
    sent = pa.concat_tables([from_ipc(p[2]) for p in merged])
    assert sorted(sent.column("site").to_pylist()) == ["a.com"] * 40 + ["b.com"] * 5
    assert sum(p[3] for p in merged) == 45, "each piece says how many events it holds"
    for shard, hour, payload, _events in merged:
        table = from_ipc(payload)
        assert {shard_for_site(s, Settings().shards) for s in table.column("site").to_pylist()} == {
            shard
        }
        assert {t // HOUR_MS for t in table.column("ts").to_pylist()} == {hour}
    by_site = {
        s: [
            t - 1_700_000_000_000
            for t in sent.filter(pa.compute.equal(sent["site"], s))["ts"].to_pylist()
        ]
        for s in ("a.com", "b.com")
    }
    assert by_site == {"a.com": [0, 1] * 20, "b.com": list(range(5))}, "arrival order kept"


@pytest.mark.anyio
async def test_the_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = asyncio.Event()
    handle = _Link(gate)
    ingress = deployment.RayIngest(Settings(), _Directory(handle))  # type: ignore[arg-type]
    one = _rows(100)
    monkeypatch.setattr(deployment, "QUEUED_BYTES_MAX", 3 * 100 * deployment.ROW_BYTES_ESTIMATE)
    first = asyncio.ensure_future(ingress.commit({0: one}))
    await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(ingress.commit({0: one})) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(Unavailable):
        await ingress.commit({0: one})
    gate.set()
    await asyncio.gather(first, *queued)


def test_a_proposal_lingers_only_while_the_ingress_is_busy() -> None:
    busy, idle = deployment.BUSY_GAP_S / 2, deployment.BUSY_GAP_S * 2
    assert deployment.should_linger(1000, busy)
    assert not deployment.should_linger(1000, idle), "at low load a write leaves at once"
    assert not deployment.should_linger(1000, float("inf")), "the first proposal ever"
    assert not deployment.should_linger(deployment.LINGER_BYTES_MAX, busy), "full enough"


@pytest.mark.anyio
async def test_writes_after_a_recent_proposal_wait_for_each_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Right after a proposal, the next one waits LINGER_S, so writes that arrive a
    moment apart share it; long after, a lone write is proposed at once."""
    monkeypatch.setattr(deployment, "LINGER_S", 0.2)  # wide, so the test is not a race
    monkeypatch.setattr(deployment, "BUSY_GAP_S", 0.5)
    gate = asyncio.Event()
    gate.set()
    handle = _Link(gate)
    ingress = deployment.RayIngest(Settings(), _Directory(handle))  # type: ignore[arg-type]
    await ingress.commit({0: _rows(1)})  # the first proposal ever leaves at once
    assert len(handle.calls) == 1
    first = asyncio.ensure_future(ingress.commit({0: _rows(1)}))
    await asyncio.sleep(0.05)
    assert len(handle.calls) == 1, "the second proposal lingers"
    second = asyncio.ensure_future(ingress.commit({0: _rows(2)}))
    await asyncio.gather(first, second)
    assert len(handle.calls) == 2, "the two writes shared one proposal"
    await asyncio.sleep(0.6)  # idle now: longer than BUSY_GAP_S since the last proposal
    lone = asyncio.ensure_future(ingress.commit({0: _rows(1)}))
    await asyncio.sleep(0.05)
    assert len(handle.calls) == 3, "a lone write at low load is proposed at once"
    await lone


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _SilentLink:
    """A paused master's link: the call is sent, and no answer ever comes."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, method: str, payload: Any, timeout: float) -> int:
        self.calls += 1
        await asyncio.sleep(timeout)
        raise TimeoutError


class _FailoverDirectory:
    """Replica 0 is master until it is suspected; then replica 1 is."""

    def __init__(self) -> None:
        self.links: dict[int, Any] = {0: _SilentLink(), 1: _Link(asyncio.Event())}
        self.links[1].gate.set()
        self.suspected: list[int] = []

    async def master(self, group: int) -> tuple[int, Any]:
        return (1 if self.suspected else 0), None

    def link(self, group: int, replica: int) -> Any:
        return self.links[replica]

    def forget(self, group: int, hint: int | None = None) -> None:
        pass

    def suspect(self, group: int, replica: int) -> None:
        self.suspected.append(replica)

    async def still_followed(self, group: int, replica: int) -> bool:
        return False  # its followers stood: it is paused or cut off


class _SlowLink:
    """A master that is alive but slow: it commits after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.calls = delay_s, 0

    async def call(self, method: str, payload: Any, timeout: float) -> int:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return 1


class _SlowMasterDirectory(_FailoverDirectory):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.links[0] = _SlowLink(delay_s)
        self.checks = 0

    async def still_followed(self, group: int, replica: int) -> bool:
        self.checks += 1
        return True  # its followers still hear it


@pytest.mark.anyio
async def test_a_slow_master_that_is_still_followed_is_waited_for() -> None:
    """Past the deadline the ingress asks whether the master is still followed; while
    it is, no other master can exist, so the write waits for it instead of failing."""
    settings = Settings(propose_deadline_s=0.1, commit_timeout_s=5.0)
    directory = _SlowMasterDirectory(delay_s=0.6)
    ingress = deployment.RayIngest(settings, directory)  # type: ignore[arg-type]
    await ingress.commit({0: _rows(3)})  # without ids: a resend would not be safe
    assert directory.links[0].calls == 1 and directory.links[1].calls == []
    assert directory.suspected == [] and directory.checks >= 2


def _rows_with_ids(n: int) -> list[Row]:
    return [
        (1_700_000_000_000 + i, "a.com", None, None, None, None, f"e{i}", None, None)
        for i in range(n)
    ]


@pytest.mark.anyio
async def test_a_silent_master_is_given_up_and_a_proposal_with_ids_resent() -> None:
    settings = Settings(propose_deadline_s=0.2, commit_timeout_s=5.0)
    directory = _FailoverDirectory()
    ingress = deployment.RayIngest(settings, directory)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    began = loop.time()
    await ingress.commit({0: _rows_with_ids(3)})
    waited = loop.time() - began
    assert directory.suspected == [0], "the silent master should be suspected"
    assert directory.links[0].calls == 1 and len(directory.links[1].calls) == 1
    assert 0.2 <= waited < 2.0, f"answered after {waited:.2f} s, not after one deadline"
    resent = from_ipc(directory.links[1].calls[0][0][2])
    assert resent.column("id").to_pylist() == ["e0", "e1", "e2"], "the same events, ids and all"


@pytest.mark.anyio
async def test_a_proposal_without_ids_is_not_resent_but_answered_503_in_time() -> None:
    settings = Settings(propose_deadline_s=0.2, commit_timeout_s=5.0)
    directory = _FailoverDirectory()
    ingress = deployment.RayIngest(settings, directory)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(Unavailable):
        await ingress.commit({0: _rows(3) + _rows_with_ids(2)})
    assert loop.time() - began < 2.0
    assert directory.links[1].calls == [], "a copy without ids may commit: never resend it"
    # The next write goes to the new master without waiting.
    began = loop.time()
    await ingress.commit({0: _rows(1)})
    assert loop.time() - began < 0.2
    assert len(directory.links[1].calls) == 1


def test_a_proposal_deadline_grows_with_its_bytes() -> None:
    settings = Settings(propose_deadline_s=1.0)
    assert deployment.deadline_for(settings, 0) == 1.0
    assert deployment.deadline_for(settings, 64 * 1024 * 1024) == 2.0
    with pytest.raises(ValueError, match="propose_deadline_s"):
        Settings(propose_deadline_s=20.0, commit_timeout_s=10.0).validate()


class _AnsweringWhileAskedDirectory(_FailoverDirectory):
    """The master answers just while its followers are being asked, and they say it
    lost its group: the commit it reported must be taken, not thrown away."""

    def __init__(self) -> None:
        super().__init__()
        self.links[0] = _SlowLink(delay_s=0.15)

    async def still_followed(self, group: int, replica: int) -> bool:
        await asyncio.sleep(0.2)  # the answer lands meanwhile
        return False


@pytest.mark.anyio
async def test_an_answer_that_lands_while_followers_are_asked_is_taken() -> None:
    settings = Settings(propose_deadline_s=0.1, commit_timeout_s=5.0)
    directory = _AnsweringWhileAskedDirectory()
    ingress = deployment.RayIngest(settings, directory)  # type: ignore[arg-type]
    await ingress.commit({0: _rows(3)})  # without ids: resending or 503 would be wrong
    assert directory.links[0].calls == 1 and directory.links[1].calls == []
    assert directory.suspected == []
