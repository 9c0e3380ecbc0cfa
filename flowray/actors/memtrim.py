"""Hand the heap's free pages back to the operating system now and then.

Replicas and gateways allocate and free payloads of hundreds of KiB to megabytes all
day, on glibc's heaps (below the mmap threshold, ``cluster.MALLOC_ENV``), and glibc
keeps the pages that freed payloads leave inside a heap: resident memory crept up
hour after hour. A low threshold (every payload its own mmap) kept memory flat but
cost up to half the batched ingest throughput in page faults and munmap
(BENCHMARKS.md, memory). Instead, each long-lived process calls ``malloc_trim(0)``
every minute, on a worker thread: it releases the free pages inside the heaps,
not only at their tops, so memory stays bounded by the working set while allocation
keeps its fast path.

Elsewhere than glibc (macOS, musl) there is no ``malloc_trim`` and this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

# A trim walks every arena under its lock and madvises the free pages (TLB shootdowns,
# then page faults on reuse): every 5 s it showed in the fleet-rate ack p99 (median
# of six runs 34 ms against 22 without trimming). Once a minute is enough for memory
# that must stay flat over hours.
TRIM_INTERVAL_S = 60.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_malloc_trim = _load_malloc_trim()


def available() -> bool:
    return _malloc_trim is not None


def trim() -> bool:
    """Release the free heap pages now; True when some memory went back to the OS.
    ctypes drops the GIL for the call, so a thread running it does not stall Python."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False


async def trim_forever(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Trim every ``interval_s`` seconds, off the event loop, until cancelled."""
    if _malloc_trim is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(trim)
        except RuntimeError:  # the default executor is shutting down with the loop
            return
