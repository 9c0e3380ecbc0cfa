"""The direct links of the write path: frames, order, calls, errors, tokens, reconnects.

Real sockets on loopback, no Ray: the server and the links are plain asyncio.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import msgpack
import pytest

from flowray.actors import wire
from flowray.actors.replica import WIRE_ERRORS, NoQuorum, NotMaster
from flowray.core.replication import Msg
from flowray.storage.segment import KIND_DATA, Entry


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def msg(i: int, payload: bytes = b"") -> Msg:
    entries = (Entry(3, i, KIND_DATA, 1, 472_222, 0, payload),) if payload else ()
    return Msg("append", 0, 1, 3, i - 1, 3, entries, i - 1, ok=bool(i % 2), transfer=False)


def test_messages_survive_encoding() -> None:
    msgs = [msg(1, b"\x00payload\xff"), msg(2), Msg("vote", 2, 0, 9, 5, 4, transfer=True)]
    assert wire.decode_msgs(wire.encode_msgs(msgs)) == msgs


class Peer:
    """A wire server that records what it receives and answers calls."""

    def __init__(self) -> None:
        self.received: list[Msg] = []
        self.arrived = asyncio.Event()
        self.server = wire.Server("127.0.0.1", self.on_msgs, self.on_call, WIRE_ERRORS)

    def on_msgs(self, msgs: list[Msg]) -> None:
        self.received += msgs
        self.arrived.set()

    async def on_call(self, method: str, args: Any) -> Any:
        if method == "echo":
            return args
        if method == "not_master":
            raise NotMaster("not me", 2, refused=False)
        if method == "no_quorum":
            raise NoQuorum("no majority")
        if method == "slow":
            await asyncio.sleep(30)
        raise KeyError(method)

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def started() -> tuple[Peer, wire.Link]:
    peer = Peer()
    await peer.server.start()
    return await started_on(peer)


async def started_on(peer: Peer) -> tuple[Peer, wire.Link]:
    """A link to a peer whose server is started."""
    address = peer.server.address

    async def resolve() -> wire.Address:
        return address

    return peer, wire.Link(resolve, WIRE_ERRORS)


@pytest.mark.anyio
async def test_one_way_messages_arrive_in_order_even_before_the_connection_is_up() -> None:
    peer, link = await started()
    sent = [msg(i, b"x" * i) for i in range(1, 200)]
    for m in sent:  # the first ones queue while the link connects
        assert link.send(wire.MSGS, wire.encode_msgs([m]))
    await peer.wait_for(len(sent))
    assert peer.received == sent
    link.close()
    await peer.server.close()


@pytest.mark.anyio
async def test_connect_makes_the_connection_ahead_of_a_first_call() -> None:
    peer, link = await started()
    assert not link.connected
    assert await link.connect(5) is True
    assert link.connected
    assert await link.connect(5) is True, "connected already: nothing to do"
    assert await link.call("echo", 7, 5) == 7
    link.close()
    assert await link.connect(5) is False, "a closed link stays closed"
    await peer.server.close()


@pytest.mark.anyio
async def test_connect_to_an_unreachable_peer_answers_false_in_time() -> None:
    with socket.socket() as holder:  # a port that nothing listens on
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]

        async def resolve() -> wire.Address:
            return ("127.0.0.1", port, "token")

        link = wire.Link(resolve, WIRE_ERRORS)
        async with asyncio.timeout(5):
            assert await link.connect(2) is False
        link.close()

        async def never() -> wire.Address:
            await asyncio.sleep(60)
            raise AssertionError("not reached")

        slow = wire.Link(never, WIRE_ERRORS)
        async with asyncio.timeout(5):
            assert await slow.connect(0.2) is False
        slow.close()


@pytest.mark.anyio
async def test_calls_answer_and_raise_the_peers_errors_as_themselves() -> None:
    peer, link = await started()
    assert await link.call("echo", [[1, 2, b"bytes", 4]], 5) == [[1, 2, b"bytes", 4]]
    with pytest.raises(NotMaster) as caught:
        await link.call("not_master", None, 5)
    assert caught.value.leader == 2 and caught.value.refused is False
    with pytest.raises(NoQuorum, match="no majority"):
        await link.call("no_quorum", None, 5)
    with pytest.raises(wire.RemoteError, match="KeyError"):
        await link.call("unknown", None, 5)
    many = await asyncio.gather(*(link.call("echo", i, 5) for i in range(100)))
    assert many == list(range(100)), "concurrent calls get their own answers"
    link.close()
    await peer.server.close()


@pytest.mark.anyio
async def test_a_call_whose_connection_breaks_has_an_unknown_outcome() -> None:
    peer, link = await started()
    assert await link.call("echo", 1, 5) == 1
    pending = asyncio.ensure_future(link.call("slow", None, 30))
    await asyncio.sleep(0.1)
    await peer.server.close()  # the peer dies with the call in flight
    with pytest.raises(wire.LinkDown):
        await pending
    with pytest.raises(wire.LinkDown):
        await link.call("echo", 1, 5)  # nobody listens any more
    link.close()


@pytest.mark.anyio
async def test_a_link_finds_its_peer_again_on_a_new_port() -> None:
    first = Peer()
    addresses = [await first.server.start()]

    async def resolve() -> wire.Address:
        return addresses[-1]

    link = wire.Link(resolve, WIRE_ERRORS)
    assert await link.call("echo", "a", 5) == "a"
    await first.server.close()  # as if Ray restarted the replica: a new port, a new token
    second = Peer()
    addresses.append(await second.server.start())
    assert addresses[1][1:] != addresses[0][1:]
    for _ in range(100):  # the first sends find the connection broken, later ones reconnect
        link.send(wire.MSGS, wire.encode_msgs([msg(7)]))
        if second.received:
            break
        await asyncio.sleep(0.05)
    assert second.received and second.received[0] == msg(7)
    assert await link.call("echo", "b", 5) == "b"
    link.close()
    await second.server.close()


@pytest.mark.anyio
async def test_a_connection_without_the_token_is_refused() -> None:
    peer = Peer()
    host, port, token = await peer.server.start()

    async def wrong() -> wire.Address:
        return host, port, "0" * len(token)

    link = wire.Link(wrong, WIRE_ERRORS)
    link.send(wire.MSGS, wire.encode_msgs([msg(1)]))
    with pytest.raises(wire.LinkDown):
        await link.call("echo", 1, 5)
    await asyncio.sleep(0.2)
    assert peer.received == [], "nothing from a peer without the token may be taken"
    link.close()
    await peer.server.close()


@pytest.mark.anyio
async def test_an_unreachable_peer_costs_nothing_and_its_queue_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0

    async def nowhere() -> wire.Address:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        raise ConnectionRefusedError("no such replica")

    monkeypatch.setattr(wire, "PENDING_BYTES_MAX", 10_000)
    monkeypatch.setattr(wire, "RETRY_BACKOFF_S", 5.0)
    link = wire.Link(nowhere, WIRE_ERRORS)
    kept = [link.send(wire.MSGS, b"x" * 1000) for _ in range(50)]
    assert kept.count(True) < 11 and link.dropped >= 40, "the queue keeps at most its bound"
    await asyncio.sleep(0.3)
    assert calls == 1, "one connection attempt at a time"
    assert not link.send(wire.MSGS, b"x"), "sends during the back-off are dropped at once"
    link.close()


@pytest.mark.anyio
async def test_an_oversized_frame_closes_the_connection() -> None:
    peer = Peer()
    host, port, token = await peer.server.start()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(wire.frame(wire.HELLO, token.encode()))
    writer.write(wire.FRAME.pack(wire.FRAME_BYTES_MAX + 1, wire.MSGS))
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.read() == b"", "the server hung up"
    writer.close()
    await peer.server.close()


@pytest.mark.anyio
async def test_a_caller_that_reads_no_replies_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies wait in the server's buffer for their caller, up to a bound: a caller
    that keeps calling and never reads is disconnected, and the server answers others."""
    monkeypatch.setattr(wire, "REPLY_BUFFER_BYTES_MAX", 64 * 1024)
    peer = Peer()
    host, port, token = await peer.server.start()
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little
    writer.write(wire.frame(wire.HELLO, token.encode()))
    big = b"r" * 8192
    cut = False
    async with asyncio.timeout(20):
        for call_id in range(1, 20_000):
            body = msgpack.packb([call_id, "echo", big], use_bin_type=True)
            try:
                writer.write(wire.frame(wire.CALL, body))
                await writer.drain()
            except ConnectionError:
                cut = True
                break
            await asyncio.sleep(0)
    assert cut, "the server kept every reply for a caller that reads none"
    assert len(peer.server._conns) == 0
    writer.close()
    _peer, link = await started_on(peer)
    assert await link.call("echo", 7, 5) == 7, "others are still answered"
    link.close()
    await peer.server.close()


_SENDER = """
import asyncio, sys, time
from flowray.actors import wire
from flowray.actors.replica import WIRE_ERRORS
from flowray.core.replication import Msg

async def main():
    address = (sys.argv[1], int(sys.argv[2]), sys.argv[3])
    async def resolve():
        return address
    link = wire.Link(resolve, WIRE_ERRORS)
    link.send(wire.MSGS, wire.encode_msgs([Msg("append", 2, 1, 1, 0, 0)]))
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.anyio
async def test_a_peer_killed_ends_its_connection_and_is_named() -> None:
    """kill -9 of a process that sent messages: the server names it (on_gone) at once,
    which a follower takes as a sign that its master died. Our own close names none."""
    gone: list[int] = []
    peer = Peer()
    peer.server = wire.Server("127.0.0.1", peer.on_msgs, peer.on_call, WIRE_ERRORS, gone.append)
    host, port, token = await peer.server.start()
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SENDER, host, str(port), token
    )
    try:
        await peer.wait_for(1)
        assert peer.received[0].src == 2 and gone == []
        sender.kill()  # SIGKILL: the kernel closes its sockets
        async with asyncio.timeout(10):
            while not gone:
                await asyncio.sleep(0.01)
        assert gone == [2]
    finally:
        if sender.returncode is None:
            sender.kill()
        await sender.wait()

    # a live sender's connection, closed by our own close(): nobody is named
    async def resolve() -> wire.Address:
        return host, port, token

    link = wire.Link(resolve, WIRE_ERRORS)
    link.send(wire.MSGS, wire.encode_msgs([Msg("append", 0, 1, 1, 0, 0)]))
    await peer.wait_for(2)
    await peer.server.close()
    await asyncio.sleep(0.2)
    assert gone == [2]
    link.close()
