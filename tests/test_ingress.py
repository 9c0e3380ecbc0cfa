"""The ingress batcher: concurrent writes of a group merge into one proposal, every
request is answered only when its proposal commits, and the queue has a bound."""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa
import pytest

from flowray.config import Settings
from flowray.events import EVENT_SCHEMA
from flowray.ingest import Piece, from_ipc, to_ipc
from flowray.serve import deployment
from flowray.serve.app import Unavailable


class _Method:
    def __init__(self, calls: list[Any], gate: asyncio.Event) -> None:
        self.calls, self.gate = calls, gate

    def remote(self, payload: Any) -> Any:
        self.calls.append(payload)

        async def commit() -> int:
            await self.gate.wait()
            return len(self.calls)

        return asyncio.ensure_future(commit())


class _Handle:
    def __init__(self, gate: asyncio.Event) -> None:
        self.calls: list[Any] = []
        self.propose = _Method(self.calls, gate)


class _Directory:
    def __init__(self, handle: _Handle) -> None:
        self.h = handle

    async def master(self, group: int) -> tuple[int, Any]:
        return 0, self.h

    def forget(self, group: int, hint: int | None = None) -> None:
        pass


def _piece(n: int, site: str = "a.com") -> Piece:
    table = pa.Table.from_pylist(
        [{"ts": 1_700_000_000_000 + i, "site": site} for i in range(n)], schema=EVENT_SCHEMA
    )
    return Piece(0, 472_222, n, to_ipc(table))


@pytest.mark.anyio
async def test_queued_writes_merge_into_one_proposal() -> None:
    gate = asyncio.Event()
    handle = _Handle(gate)
    ingress = deployment.RayIngest(Settings(), _Directory(handle))  # type: ignore[arg-type]
    first = asyncio.ensure_future(ingress.commit({0: [_piece(1)]}))
    await asyncio.sleep(0.01)  # the first proposal is in flight
    rest = [asyncio.ensure_future(ingress.commit({0: [_piece(2)]})) for _ in range(20)]
    await asyncio.sleep(0.01)
    assert not first.done() and not any(r.done() for r in rest), "answered before commit"
    gate.set()
    await asyncio.gather(first, *rest)
    assert len(handle.calls) == 2, "twenty queued writes should share one proposal"
    merged = handle.calls[1]
    assert len(merged) == 1 and from_ipc(merged[0][2]).num_rows == 40


@pytest.mark.anyio
async def test_the_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = asyncio.Event()
    handle = _Handle(gate)
    ingress = deployment.RayIngest(Settings(), _Directory(handle))  # type: ignore[arg-type]
    one = _piece(100)
    monkeypatch.setattr(deployment, "QUEUED_BYTES_MAX", 3 * len(one.payload))
    first = asyncio.ensure_future(ingress.commit({0: [one]}))
    await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(ingress.commit({0: [one]})) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(Unavailable):
        await ingress.commit({0: [one]})
    gate.set()
    await asyncio.gather(first, *queued)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
