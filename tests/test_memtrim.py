"""malloc_trim hands freed heap pages back: the fix for memory that crept up under load."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from flowray.actors import memtrim

# In a fresh interpreter: fill the heap with 64 KiB blocks (below glibc's mmap
# threshold, so they come from the heap), keep every 16th so that the heap's top
# cannot simply be cut, free the rest, then trim. Prints RSS (MiB) before and after.
_FRAGMENT = textwrap.dedent(
    """
    import os
    from flowray.actors import memtrim

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MiB, every page touched
    kept = blocks[::16]
    del blocks
    before = rss_mib()
    released = memtrim.trim()
    print(before, rss_mib(), released, len(kept))
    """
)


@pytest.mark.skipif(not memtrim.available(), reason="no glibc malloc_trim here")
def test_trim_returns_the_free_pages_inside_a_fragmented_heap() -> None:
    env = dict(os.environ, MALLOC_ARENA_MAX="1")
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENT], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    before, after, released, kept = out.stdout.split()
    assert int(kept) == 256
    # 240 of the 256 MiB were freed; without the trim they stay resident.
    assert float(before) > 200, out.stdout
    assert released == "True"
    assert float(before) - float(after) > 150, out.stdout


def test_trim_forever_trims_on_its_interval_until_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memtrim, "trim", lambda: calls.append(1) or True)

    async def run() -> None:
        task = asyncio.create_task(memtrim.trim_forever(0.01))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = len(calls)
        await asyncio.sleep(0.05)
        assert len(calls) == seen  # nothing after the cancel

    if not memtrim.available():
        pytest.skip("no glibc malloc_trim here")
    asyncio.run(run())
    assert len(calls) >= 3
