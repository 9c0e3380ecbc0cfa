"""Small durable-write helpers: what 'on disk' means for flowray.

A file is durable once its data is fsynced; a new or renamed file is durable once its
directory is fsynced too. Every writer that acknowledges something goes through here.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing, do not wait
_FALLOC_FL_KEEP_SIZE = 1  # <linux/falloc.h>: allocate past the end, size unchanged
_BLOCK_BYTES = 512  # the unit of st_blocks
_sync_file_range: Any = None
_fallocate: Any = None
if sys.platform.startswith("linux"):
    _libc = ctypes.CDLL(None, use_errno=True)
    _sync_file_range = getattr(_libc, "sync_file_range", None)
    if _sync_file_range is not None:
        _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range.restype = ctypes.c_int
    _fallocate = getattr(_libc, "fallocate", None)
    if _fallocate is not None:
        _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _fallocate.restype = ctypes.c_int


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing a file's range to disk now, without waiting for
    it (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; ctypes releases the GIL). Not
    a flush: nothing becomes durable by it. It keeps a file written in small appends
    from piling up dirty pages that the kernel's flusher then writes in one burst, 30
    seconds later, in front of a write-ahead fdatasync. False where it is not
    available or the kernel refused (only a hint either way)."""
    if _sync_file_range is None or length <= 0:
        return False
    return bool(_sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0)


def preallocate(fd: int, offset: int, length: int) -> int:
    """Reserve disk space for a file's next ``length`` bytes from ``offset`` without
    changing its size (Linux ``fallocate(FALLOC_FL_KEEP_SIZE)``): readers and recovery
    still see only what was written, and appends then fill extents that already exist
    instead of allocating blocks when the kernel writes them back. On ext4 those
    allocations, committed by the journal, made every replica's write-ahead fdatasync
    wait 50-130 ms every few seconds at the fleet rate. Only a hint: returns 0 when
    done, else the errno (``errno.EOPNOTSUPP`` where it is not available at all). Give
    the space back with :func:`trim_preallocation` once the file stops growing."""
    if _fallocate is None:
        return errno.EOPNOTSUPP
    if length <= 0:
        return 0
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def trim_preallocation(fd: int) -> bool:
    """Give back the space a file holds past its end (see :func:`preallocate`), if it
    holds more than its size rounded up to a page: truncating a file to its own size
    frees the blocks past it. True if it was trimmed; False if there was nothing to
    trim or the system refused (only space is at stake: never raises)."""
    try:
        st = os.fstat(fd)
        if st.st_blocks * _BLOCK_BYTES <= -(-st.st_size // 4096) * 4096:
            return False
        os.ftruncate(fd, st.st_size)
    except OSError:
        return False
    return True


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(path: Path) -> None:
    """``mkdir -p``, flushing each new directory's entry in its parent: a directory
    whose entry never reached the disk vanishes in a power cut with all it holds."""
    missing = []
    at = path
    while not at.exists():
        missing.append(at)
        at = at.parent
    if not missing:
        return
    path.mkdir(parents=True, exist_ok=True)
    for made in reversed(missing):  # from the top: each one's parent
        fsync_path(made.parent)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a fully written ``tmp`` over ``path`` so readers see old or new, never half."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    make_dirs_durably(path.parent)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    replace_durably(tmp, path)
