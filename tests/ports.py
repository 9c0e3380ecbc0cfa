"""Free loopback ports for test servers, outside the kernel's ephemeral range.

A port taken with ``bind(("127.0.0.1", 0))`` comes from the ephemeral range, where
any outgoing connection (Ray opens hundreds while it starts) may take it as its local
port before our server binds it, and the bind then fails with EADDRINUSE (CI saw this
once: a cluster restarted on its recorded ports). Ports below the ephemeral range and
above Ray's worker ports (10002-19999) are only ever taken by an explicit bind.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

LOWEST = 20000  # above Ray's default worker ports
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing holds now and this process has not handed out before;
    random (seeded by pid and time), so concurrent test processes rarely pick the same."""
    high = min(_ephemeral_low(), 65536)
    if high - LOWEST < 1000:
        raise RuntimeError(f"no port range below the ephemeral ports ({high}) to choose from")
    rng = random.Random(os.getpid() ^ random.SystemRandom().getrandbits(32))
    for _ in range(1000):
        port = rng.randrange(LOWEST, high)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in {LOWEST}-{high - 1} after 1000 tries")
