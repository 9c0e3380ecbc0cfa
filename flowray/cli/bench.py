"""flowray bench: runs a benchmark script of a source checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from flowray.cli.common import (
    app,
    fail,
)

BENCHMARKS = ("ingest", "query", "freshness", "process", "memory", "soak", "cpu")


@app.command()
def bench(
    which: Annotated[
        str, typer.Argument(help="ingest, query, freshness, process, memory, soak or cpu.")
    ],
    args: Annotated[
        list[str] | None, typer.Argument(help="Passed to the script, after --.")
    ] = None,
) -> None:
    """Run a benchmark script from scripts/ (a source checkout); see BENCHMARKS.md."""
    if which not in BENCHMARKS:
        fail(f"benchmark must be one of {', '.join(BENCHMARKS)}")
    script = Path(__file__).resolve().parents[2] / "scripts" / f"bench_{which}.py"
    if not script.is_file():
        fail(f"{script} is missing: benchmarks run from a source checkout of flowray")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *(args or [])]))
