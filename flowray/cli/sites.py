"""Site commands: flowray sites add / list / remove, on the registry of sites that
``POST /api/event`` takes events for (WAREHOUSE/sites.sqlite; no cluster needed, as
``flowray token`` works on the token store)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table

from flowray.cli.common import DataDir, app, console, fail
from flowray.config import DEFAULT_DATA_DIR, Settings

sites_app = typer.Typer(
    help="The sites /api/event takes events for, in WAREHOUSE/sites.sqlite (no cluster needed).",
    no_args_is_help=True,
)
app.add_typer(sites_app, name="sites")


def _sites_path(data_dir: Path) -> Path:
    from flowray.warehouse.sites import sites_file

    return sites_file(Settings.from_env(data_dir=data_dir).warehouse_dir)


@sites_app.command("add")
def sites_add(
    domain: Annotated[str, typer.Argument(metavar="DOMAIN", help="The site, e.g. example.com.")],
    timezone: Annotated[
        str, typer.Option("--timezone", help="IANA time zone of its reports, e.g. Europe/Berlin.")
    ] = "UTC",
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
) -> None:
    """Register a site: the tracker endpoint takes its events within a few seconds."""
    from flowray.warehouse.sites import SiteStore, SitesUnavailable

    try:
        site, new = SiteStore(_sites_path(data_dir)).add(domain, timezone)
    except (ValueError, SitesUnavailable) as exc:
        fail(str(exc))
        return
    state = "registered" if new else "was registered already"
    console.print(f"site {site.domain} ({site.timezone}) {state}")


@sites_app.command("list")
def sites_list(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the registered sites and their time zones."""
    from flowray.warehouse.sites import SiteStore, SitesUnavailable

    try:
        sites = SiteStore(_sites_path(data_dir)).sites()
    except SitesUnavailable as exc:
        fail(str(exc))
        return
    if as_json:
        sys.stdout.write(orjson.dumps([s.public() for s in sites]).decode() + "\n")
        return
    table = Table(title=f"flowray sites in {data_dir}")
    for col in ("domain", "time zone", "added"):
        table.add_column(col)
    for s in sites:
        added = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(s.added_ms / 1000))
        table.add_row(s.domain, s.timezone, added)
    console.print(table)


@sites_app.command("remove")
def sites_remove(
    domain: Annotated[str, typer.Argument(metavar="DOMAIN", help="A registered site.")],
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
) -> None:
    """Unregister a site: its new events are refused; its stored events stay."""
    from flowray.warehouse.sites import SiteStore, SitesUnavailable

    try:
        site = SiteStore(_sites_path(data_dir)).remove(domain)
    except (ValueError, SitesUnavailable) as exc:
        fail(str(exc))
        return
    if site is None:
        fail(f"site {domain!r} is not registered in {data_dir} (see 'flowray sites list')")
        return
    console.print(f"site {site.domain} is unregistered")
