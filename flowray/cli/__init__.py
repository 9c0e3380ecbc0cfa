"""The ``flowray`` command line: run a cluster, feed it, process, query.

Commands that talk to a running cluster find its URL in the data directory (written
by ``flowray up``) or take ``--url`` / ``FLOWRAY_URL``. Each group of commands lives
in a module of its own; importing this package registers them all on ``app``.
"""

from __future__ import annotations

from flowray.cli import bench, cluster, data, history, migrate, sites, tokens
from flowray.cli.common import app

__all__ = ["app", "main"]
# Imported for their commands.
_COMMAND_MODULES = (bench, cluster, data, history, migrate, sites, tokens)


def main() -> None:
    app()
