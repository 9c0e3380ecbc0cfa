"""Small durable-write helpers: what 'on disk' means for flowray.

A file is durable once its data is fsynced; a new or renamed file is durable once its
directory is fsynced too. Every writer that acknowledges something goes through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a fully written ``tmp`` over ``path`` so readers see old or new, never half."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    replace_durably(tmp, path)
