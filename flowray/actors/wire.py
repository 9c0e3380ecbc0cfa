"""Direct TCP links for the write path, beside Ray.

A Ray actor call took 3-7 ms one way on the 2-core reference machine: a master's
append reached its followers 5.7-7.3 ms after it was sent and their answers took
3.6 ms back, so a commit that needs four such hops could not be acknowledged in
under 20 ms. Ray stays the control plane: it places, restarts and names the
replicas, and hands out each replica's address and token (a Ray call, so Ray's own
authentication guards them). The replication messages and the ingress's proposals
go over plain asyncio TCP connections instead: frames of a length, a type and a
msgpack body, in order, one connection per direction per pair.

A :class:`Link` is one outgoing connection. It finds its peer's address through a
resolver each time it connects, so a peer that Ray restarted on a new port is found
again. One-way sends never wait: while the link connects they queue (bounded), and
past the bound or while the peer is unreachable they are dropped, which the
replication core copes with (it resends on the next heartbeat). Calls wait for their
reply; if the connection breaks first, their outcome is unknown (:class:`LinkDown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgpack

from flowray.core.invariant import require
from flowray.core.replication import Msg
from flowray.storage.segment import Entry

log = logging.getLogger("flowray.actors.wire")

FRAME = struct.Struct("!IB")  # body length, frame type
HELLO, MSGS, CALL, REPLY = range(4)
# Appends are capped by the core (append_bytes_max) and proposals by the ingress's
# queue (QUEUED_BYTES_MAX); a larger frame is a bug or an attack: drop the connection.
FRAME_BYTES_MAX = 512 * 1024 * 1024
# One-way messages waiting for a connection or for the socket to drain, at most.
PENDING_BYTES_MAX = 64 * 1024 * 1024
# Replies waiting for a caller to read them, at most: a caller that sends calls and
# reads no answers is cut off (its calls' outcomes are then unknown to it), rather
# than growing this process's memory without bound.
REPLY_BUFFER_BYTES_MAX = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 2.0
# After a failed connect, one-way sends are dropped for this long before the next try.
RETRY_BACKOFF_S = 0.1
HELLO_TIMEOUT_S = 5.0

Address = tuple[str, int, str]  # host, port, token
Resolver = Callable[[], Awaitable[Address]]
Handler = Callable[[str, Any], Awaitable[Any]]


class LinkDown(ConnectionError):
    """The connection broke or could not be made; a call's outcome is unknown."""


class RemoteError(RuntimeError):
    """The peer's handler raised an error it does not know how to send back."""


def encode_msgs(msgs: list[Msg]) -> bytes:
    return msgpack.packb(
        [
            (
                m.kind,
                m.src,
                m.dst,
                m.term,
                m.index,
                m.log_term,
                [(e.term, e.index, e.kind, e.shard, e.hour, e.part, e.payload) for e in m.entries],
                m.commit,
                m.ok,
                m.transfer,
            )
            for m in msgs
        ],
        use_bin_type=True,
    )


def decode_msgs(body: bytes) -> list[Msg]:
    out = []
    for kind, src, dst, term, index, log_term, entries, commit, ok, transfer in msgpack.unpackb(
        body, use_list=False
    ):
        out.append(
            Msg(
                kind,
                src,
                dst,
                term,
                index,
                log_term,
                tuple(Entry(*e) for e in entries),
                commit,
                ok,
                transfer,
            )
        )
    return out


def frame(kind: int, body: bytes) -> bytes:
    require(len(body) <= FRAME_BYTES_MAX, f"a frame of {len(body)} bytes is too large")
    return FRAME.pack(len(body), kind) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    length, kind = FRAME.unpack(await reader.readexactly(FRAME.size))
    if length > FRAME_BYTES_MAX:
        raise ConnectionError(f"a frame of {length} bytes announced")
    return kind, await reader.readexactly(length)


# ---- errors across the wire ------------------------------------------------------------
def encode_error(exc: BaseException, known: Mapping[str, type[BaseException]]) -> list[Any]:
    name = type(exc).__name__
    if known.get(name) is type(exc):
        reduced = exc.__reduce__()
        return [name, list(reduced[1]) if isinstance(reduced, tuple) else [str(exc)]]
    return ["", [f"{name}: {exc}"]]


def decode_error(name: str, args: list[Any], known: Mapping[str, type[BaseException]]) -> Exception:
    cls = known.get(name)
    if cls is None:
        return RemoteError(*args)
    return cls(*args)  # type: ignore[return-value]


# ---- server ------------------------------------------------------------------------------
class Server:
    """Accepts links from peers and ingress processes; each must first show the token."""

    def __init__(
        self,
        host: str,
        on_msgs: Callable[[list[Msg]], None],
        on_call: Handler,
        errors: Mapping[str, type[BaseException]],
        on_gone: Callable[[int], None] | None = None,
    ) -> None:
        """``on_gone(peer)``: a connection that brought messages from ``peer`` ended
        (the peer closed it, or its process died and the kernel did)."""
        self.host = host
        self.token = secrets.token_hex(16)
        self.on_msgs, self.on_call, self.errors = on_msgs, on_call, errors
        self.on_gone = on_gone
        self._closing = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._answering: set[asyncio.Task[None]] = set()  # held, or asyncio may drop them

    async def start(self) -> Address:
        self._server = await asyncio.start_server(self._serve, self.host, 0, backlog=256)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.address

    @property
    def address(self) -> Address:
        return self.host, self.port, self.token

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        sender: int | None = None  # whose messages this connection brings
        try:
            kind, body = await asyncio.wait_for(read_frame(reader), HELLO_TIMEOUT_S)
            if kind != HELLO or not hmac.compare_digest(body, self.token.encode()):
                log.warning("a connection without the right token was closed")
                return
            while True:
                kind, body = await read_frame(reader)
                if kind == MSGS:
                    msgs = decode_msgs(body)
                    if msgs:
                        sender = msgs[0].src
                    self.on_msgs(msgs)
                elif kind == CALL:
                    call_id, method, args = msgpack.unpackb(body)
                    task = asyncio.create_task(self._answer(writer, call_id, method, args))
                    self._answering.add(task)
                    task.add_done_callback(self._answering.discard)
                else:
                    log.warning("an unknown frame type %s; closing the connection", kind)
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            # The peer went away; it reconnects if it wants to. If it cut the
            # connection (not our own close()), tell whose messages it brought.
            if sender is not None and self.on_gone is not None and not self._closing:
                self.on_gone(sender)
        except (TimeoutError, ValueError):
            pass  # no token in time, or garbage: the peer reconnects if it wants to
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _answer(
        self, writer: asyncio.StreamWriter, call_id: int, method: str, args: Any
    ) -> None:
        try:
            reply = [call_id, True, await self.on_call(method, args)]
        except Exception as exc:  # sent back to the caller, which decides
            reply = [call_id, False, encode_error(exc, self.errors)]
        if writer.is_closing():
            return
        writer.write(frame(REPLY, msgpack.packb(reply, use_bin_type=True)))
        if writer.transport.get_write_buffer_size() > REPLY_BUFFER_BYTES_MAX:
            log.warning("a caller reads none of its replies; closing its connection")
            writer.transport.abort()


# ---- client ------------------------------------------------------------------------------
class Link:
    """One outgoing connection: one-way messages (never waited for) and calls."""

    def __init__(
        self, resolve: Resolver, errors: Mapping[str, type[BaseException]] | None = None
    ) -> None:
        self.resolve = resolve
        self.errors = errors or {}
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._retry_at = 0.0
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self.dropped = 0
        self._closed = False
        # The last connection broke or could not be made: calls fail at once (their
        # caller looks for another master) while a reconnect goes on behind them.
        self._failed = False

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def send(self, kind: int, body: bytes) -> bool:
        """Queue a one-way frame; False if it was dropped (peer unreachable, or full)."""
        data = frame(kind, body)
        if self.connected:
            writer = self._writer
            require(writer is not None, "connected without a writer")
            if writer.transport.get_write_buffer_size() > PENDING_BYTES_MAX:  # type: ignore[union-attr]
                self.dropped += 1
                return False
            writer.write(data)  # type: ignore[union-attr]
            return True
        if time.monotonic() < self._retry_at or self._closed:
            self.dropped += 1
            return False
        if self._pending_bytes + len(data) > PENDING_BYTES_MAX:
            self.dropped += 1
            return False
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._ensure_connecting()
        return True

    async def call(self, method: str, args: Any, timeout: float) -> Any:
        """Call ``method`` on the peer; its error is raised here as the same class when
        known. LinkDown means the outcome is unknown."""
        if not self.connected:
            self._ensure_connecting()
            task = self._connecting
            if task is not None and not self._failed:
                await asyncio.shield(task)
            if not self.connected:
                raise LinkDown("no connection to the peer")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self._writer.write(  # type: ignore[union-attr]
                frame(CALL, msgpack.packb([call_id, method, args], use_bin_type=True))
            )
            return await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(call_id, None)

    async def connect(self, timeout: float) -> bool:
        """Connect now, if not connected (a first call then finds the connection made);
        whether connected, within ``timeout``."""
        if not self.connected and not self._closed:
            self._ensure_connecting()
            task = self._connecting
            if task is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout)
        return self.connected

    def close(self) -> None:
        self._closed = True
        self._drop_connection(LinkDown("the link was closed"))
        if self._connecting is not None:
            self._connecting.cancel()

    # ---- connection --------------------------------------------------------------------
    def _ensure_connecting(self) -> None:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            host, port, token = await asyncio.wait_for(self.resolve(), CONNECT_TIMEOUT_S)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
            )
        except Exception as exc:  # unreachable, not resolvable, timed out: retry later
            log.debug("connect failed: %s", exc)
            self._failed = True
            self._retry_at = time.monotonic() + RETRY_BACKOFF_S
            self._pending, self._pending_bytes = [], 0
            return
        if self._closed:  # closed while it connected
            writer.close()
            return
        writer.write(frame(HELLO, token.encode()))
        if self._pending:
            writer.write(b"".join(self._pending))
        self._pending, self._pending_bytes = [], 0
        self._writer = writer
        self._failed = False
        self._reader_task = asyncio.create_task(self._read_replies(reader, writer))

    async def _read_replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        error: Exception = LinkDown("the connection closed")
        try:
            while True:
                kind, body = await read_frame(reader)
                if kind != REPLY:
                    error = LinkDown(f"an unexpected frame type {kind}")
                    break
                call_id, ok, value = msgpack.unpackb(body)
                future = self._calls.pop(call_id, None)
                if future is None or future.done():
                    continue  # its caller gave up waiting
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(decode_error(value[0], value[1], self.errors))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            error = LinkDown(f"the connection broke: {exc}")
        if self._writer is writer:
            self._drop_connection(error)

    def _drop_connection(self, error: Exception) -> None:
        writer, self._writer = self._writer, None
        self._failed = True
        if writer is not None:
            writer.close()
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(error)
