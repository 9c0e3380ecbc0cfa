"""The docs: README.md documents every CLI command, HTTP route and setting, and the
repository stands alone (no doc cites a file outside it)."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from flowray.cli import app as cli_app
from flowray.config import Settings, settings_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SETTINGS_BEGIN = "<!-- settings:begin -->\n"
SETTINGS_END = "<!-- settings:end -->"
REGENERATE = (
    "regenerate it with: .venv/bin/python -c "
    "\"from flowray.config import settings_table; print(settings_table(), end='')\" "
    "and paste the output between the markers"
)


def test_every_cli_command_is_documented() -> None:
    group = typer.main.get_command(cli_app)
    names = sorted(group.commands)  # type: ignore[attr-defined]
    assert {"up", "down", "status", "ingest", "process", "query"} <= set(names)
    missing = [n for n in names if f"`flowray {n}" not in README]
    assert not missing, f"README.md does not document: {missing}"


def test_every_http_route_is_documented() -> None:
    routes = _routes()
    assert "/v1/events" in routes and "/v1/sites/{site}/traffic" in routes
    missing = [r for r in routes if f"{r}`" not in README and f"{r}?" not in README]
    assert not missing, f"README.md does not document: {missing}"


def _routes() -> list[str]:
    """The app's own routes (FastAPI's /docs helpers aside), from the app itself: its
    OpenAPI paths (every route of every router it includes, with its prefix) and any
    route added to the app directly."""
    from fastapi.routing import APIRoute

    from flowray.api.app import create_app
    from flowray.config import Settings
    from flowray.core.router import ShardMap
    from flowray.query.cache import MemoryCache

    app = create_app(
        settings=Settings(),
        shard_map=ShardMap.round_robin(1, 1),
        ingest=None,  # type: ignore[arg-type]
        warehouse=None,
        admin=None,
        cache=MemoryCache(),  # type: ignore[arg-type]
    )
    paths = set(app.openapi()["paths"])
    paths |= {r.path for r in app.routes if isinstance(r, APIRoute)}
    return [*sorted(paths), "/docs"]


def test_readme_starts_with_the_two_commands() -> None:
    head = README.split("## ")[0]
    assert "scripts/up" in head and "scripts/test" in head
    assert "scripts/test" in (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()


def test_readme_settings_table_is_generated_from_settings() -> None:
    assert README.count(SETTINGS_BEGIN) == 1 and README.count(SETTINGS_END) == 1, (
        f"README.md needs one {SETTINGS_BEGIN.strip()} ... {SETTINGS_END} block; {REGENERATE}"
    )
    written = README.split(SETTINGS_BEGIN, 1)[1].split(SETTINGS_END, 1)[0]
    assert written == settings_table(), f"README.md's settings table is out of date; {REGENERATE}"


def test_every_setting_has_a_description() -> None:
    fields = Settings.model_fields
    missing = [name for name, info in fields.items() if not (info.description or "").strip()]
    assert not missing, f"flowray/config.py: give these Settings fields a description: {missing}"
    table = settings_table()
    for name in fields:
        assert f"`FLOWRAY_{name.upper()}`" in table


def test_readme_links_the_docs() -> None:
    for target in ("docs/architecture.md", "docs/operations.md", "BENCHMARKS.md"):
        assert f"]({target}" in README, f"README.md does not link {target}"
        assert (ROOT / target).is_file(), target


def test_no_file_cites_a_document_outside_the_repository() -> None:
    # Documents that once lay beside the repository (spelt in pieces, so that this
    # file does not cite them itself).
    names = [f"{stem}.md" for stem in ("DESIGN", "SEED")] + ["../" + "shared"]
    paths = [*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md")]
    for folder in ("flowray", "scripts", "tests"):
        paths += ROOT.glob(f"{folder}/**/*.py")
    cited = [
        str(p.relative_to(ROOT))
        for p in paths
        if any(name in p.read_text(errors="replace") for name in names)
    ]
    assert not cited, f"these files cite a document outside the repository: {cited}"


def test_relative_links_in_the_docs_resolve() -> None:
    """Every relative markdown link of README.md, BENCHMARKS.md and docs/ names a file
    of the repository."""
    broken = []
    for doc in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *ROOT.glob("docs/*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, f"broken links: {broken}"
