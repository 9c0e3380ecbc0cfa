"""The gateways' shared port: SO_REUSEPORT among themselves, never with a stranger."""

from __future__ import annotations

import socket

import pytest

from flowray.actors.names import gateway_name
from flowray.serve.gateway import listen_socket, require_port_free
from tests.ports import free_port


def test_gateways_share_the_port_and_each_takes_connections() -> None:
    port = free_port()
    require_port_free("127.0.0.1", port)
    a, b = listen_socket("127.0.0.1", port), listen_socket("127.0.0.1", port)
    try:
        for sock in (a, b):
            sock.listen(64)
            sock.settimeout(0.01)
        accepted = {id(a): 0, id(b): 0}
        clients = []
        for _ in range(64):  # the kernel spreads connections by their address hash
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(client)
        for sock in (a, b):
            while True:
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    break
                conn.close()
                accepted[id(sock)] += 1
        for client in clients:
            client.close()
        assert sum(accepted.values()) == 64
        assert min(accepted.values()) > 0, accepted
        with pytest.raises(OSError, match="in use"):
            require_port_free("127.0.0.1", port)
    finally:
        a.close()
        b.close()
    require_port_free("127.0.0.1", port)


def test_a_port_held_by_a_plain_listener_is_refused() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            require_port_free("127.0.0.1", port)
        with pytest.raises(OSError):
            listen_socket("127.0.0.1", port).close()


def test_gateway_names() -> None:
    assert gateway_name(0) == "flowray-gateway"
    assert [gateway_name(i) for i in (1, 2)] == ["flowray-gateway-1", "flowray-gateway-2"]
