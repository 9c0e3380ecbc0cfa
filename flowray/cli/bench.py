"""flowray bench: runs a benchmark script of a source checkout."""

from __future__ import annotations

import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from flowray.cli.common import (
    app,
    fail,
)


class Benchmark(StrEnum):
    """The scripts/bench_*.py a source checkout has."""

    ingest = "ingest"
    query = "query"
    freshness = "freshness"
    process = "process"
    memory = "memory"
    soak = "soak"
    cpu = "cpu"
    front = "front"
    visitors = "visitors"
    dimensions = "dimensions"
    insights = "insights"
    fleet = "fleet"


BENCHMARKS = tuple(b.value for b in Benchmark)


@app.command()
def bench(
    which: Annotated[Benchmark, typer.Argument(help="The benchmark (scripts/bench_*.py).")],
    args: Annotated[
        list[str] | None, typer.Argument(help="Passed to the script, after --.")
    ] = None,
) -> None:
    """Run a benchmark script from scripts/ (a source checkout); see BENCHMARKS.md."""
    script = Path(__file__).resolve().parents[2] / "scripts" / f"bench_{which.value}.py"
    if not script.is_file():
        fail(f"{script} is missing: benchmarks run from a source checkout of flowray")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *(args or [])]))
