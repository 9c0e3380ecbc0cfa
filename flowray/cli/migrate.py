"""flowray migrate-sites: move a data directory from the old site rule to UTS #46.

Site names are stored normalized, and a site's shard is a hash of that name. Until
issue 24 names were normalized by Python's IDNA 2003 codec, which folds ß into "ss",
ς into σ, drops zero-width joiners and accepts symbols; browsers (UTS #46, IDNA 2008)
keep or refuse them. The old rule kept only the folded name, so what was written under
it cannot be split again: no scan can tell the events of "faß.de" from those of
"fass.de" inside "fass.de". So nothing is moved. This command lists the stored names
such a spelling may have been folded into, says where each spelling goes now, and with
``--apply`` records the new rule so the cluster starts (``settle_site_rule`` refuses
an unrecorded data directory that holds data).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import idna
import orjson
import typer
from rich.table import Table

from flowray.cli.common import DataDir, app, console, fail
from flowray.config import DEFAULT_DATA_DIR, Settings
from flowray.core.router import (
    SITE_BYTES_MAX,
    SITE_RULE,
    SITE_RULE_OLD,
    SiteError,
    normalize_site,
)
from flowray.storage.durable import write_json_atomic

# What a finding says, most certain first (the order of the report).
KINDS = {
    "refused": "its Unicode spelling is refused now",
    "renamed": "its Unicode spelling has another name now",
    "joiner": "may hold traffic spelled with a zero-width joiner, which the old rule dropped",
    "final_sigma": "may hold traffic spelled with ς, which the old rule made σ",
    "sharp_s": "may hold traffic spelled with ß, which the old rule made ss",
}
FINDINGS_SHOWN = 50
_JOINERS = ("\u200c", "\u200d")
# The old rule's label check, frozen with it (the router's may change, this must not).
_OLD_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Finding:
    """A stored name and a spelling the old rule stored under it that the new one does not."""

    site: str
    kind: str
    spelling: str
    now: str | None  # the spelling's name under the new rule; None: refused
    why: str
    found_in: list[str] = field(default_factory=list)


def idna2003_site(raw: str) -> str:
    """The site name the old rule gave ``raw`` (normalize_site before issue 24), to say
    under which name a spelling's history lies; raises :class:`SiteError`."""
    site = raw.strip().lower().rstrip(".")
    if not site:
        raise SiteError("site is empty")
    if not site.isascii():
        try:
            site = site.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise SiteError(f"site {raw!r} is not a valid host name") from exc
    if len(site) > SITE_BYTES_MAX or not all(_OLD_LABEL.fullmatch(x) for x in site.split(".")):
        raise SiteError(f"site {raw!r} is not a valid host name")
    return site


def _unicode_label(label: str) -> str:
    """An A-label's Unicode form. The ASCII rule let any xn-- label in, and the old rule
    wrote only canonical punycode, so a label that does not round-trip is kept as is."""
    if not label.startswith("xn--"):
        return label
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        return label
    return decoded if decoded.encode("punycode") == label[4:].encode("ascii") else label


def _joined(label: str) -> Iterable[tuple[str, int]]:
    """The label with a joiner put in at each place: (label, where)."""
    for at in range(1, len(label)):
        for joiner in _JOINERS:
            yield label[:at] + joiner + label[at:], at


def _joiner_allowed(joined: tuple[str, int]) -> bool:
    """Whether IDNA 2008's contextual rule allows the joiner there (idna's own rule)."""
    try:
        return bool(idna.valid_contextj(*joined))
    except ValueError:  # a character without a name next to it: no context
        return False


def _variants(labels: list[str]) -> Iterable[tuple[str, str]]:
    """(kind, spelling): the first spelling of each kind the old rule folded into these
    labels. Joiners only where IDNA 2008 allows one (after a virama, or a non-joiner
    between joining letters), else the new rule refuses that spelling too."""
    found: dict[str, str] = {}
    for i, label in enumerate(labels):
        variants = {}
        if "ss" in label:
            variants["sharp_s"] = label.replace("ss", "ß", 1)
        if "σ" in label:
            at = label.rindex("σ")
            variants["final_sigma"] = label[:at] + "ς" + label[at + 1 :]
        if not label.isascii():
            joined = next((c for c in _joined(label) if _joiner_allowed(c)), None)
            if joined is not None:
                variants["joiner"] = joined[0]
        for kind, variant in variants.items():
            found.setdefault(kind, ".".join([*labels[:i], variant, *labels[i + 1 :]]))
    yield from found.items()


def _now(spelling: str) -> tuple[str | None, str]:
    """The spelling's name under the new rule, or None and why it is refused."""
    try:
        return normalize_site(spelling), ""
    except SiteError as exc:
        return None, str(exc).removeprefix(f"site {spelling!r} is not a valid host name: ")


def classify(site: str) -> list[Finding]:
    """What the change of rule means for a stored (old-rule, so ASCII) site name: each
    spelling the old rule folded into it that the new rule names otherwise."""
    if "xn--" not in site and "ss" not in site:
        return []  # the common case, quickly: the old rule folded nothing into it
    labels = [_unicode_label(label) for label in site.split(".")]
    spelling = ".".join(labels)
    candidates = [("spelling", spelling)] if spelling != site else []
    out = []
    for kind, variant in [*candidates, *_variants(labels)]:
        try:
            if idna2003_site(variant) != site:
                continue
        except SiteError:
            continue  # the old rule refused it: nothing of it is stored here
        now, why = _now(variant)
        if now == site:
            continue
        if kind == "spelling":
            kind = "renamed" if now else "refused"
        if now:
            where = f"now counted as {now}"
        else:
            where = f"{why}; send {site} instead" if kind == "refused" else f"refused now: {why}"
        out.append(Finding(site, kind, variant, now, where))
    return out


def warehouse_sites(root: Path) -> tuple[set[str], int]:
    """Every site name in the warehouse's Parquet files (any version, any logic), and
    the number of files read."""
    import duckdb

    files = sorted(str(p) for p in root.glob("data/*/s*/*.parquet"))
    if not files:
        return set(), 0
    con = duckdb.connect(config={"threads": 1})
    try:
        rows = con.execute("SELECT DISTINCT site FROM read_parquet(?)", [files]).fetchall()
    finally:
        con.close()
    return {str(row[0]) for row in rows}, len(files)


def token_sites(path: Path) -> dict[str, list[str]]:
    """The sites active tokens grant, each with the tokens: a grant is a stored name too."""
    from flowray.api.auth import TokenStore

    out: dict[str, list[str]] = {}
    for record in TokenStore(path).active():
        for site in record.sites:
            out.setdefault(site, []).append(f"token {record.id}")
    return out


def scan(settings: Settings) -> dict[str, Any]:
    """The report: every stored name the change of rule concerns, most certain first."""
    sites, files = warehouse_sites(settings.warehouse_dir)
    tokens = token_sites(settings.tokens_file)
    findings = []
    for site in sorted(sites | set(tokens)):
        sources = (["warehouse"] if site in sites else []) + tokens.get(site, [])
        findings += [
            Finding(f.site, f.kind, f.spelling, f.now, f.why, sources) for f in classify(site)
        ]
    order = list(KINDS)
    findings.sort(key=lambda f: (order.index(f.kind), f.site))
    counts = {kind: sum(f.kind == kind for f in findings) for kind in KINDS}
    return {
        "data_dir": str(settings.data_dir),
        "files_scanned": files,
        "sites_scanned": len(sites | set(tokens)),
        "counts": counts,
        "findings": [asdict(f) for f in findings],
    }


def lookup(raw: str) -> dict[str, Any]:
    """Where a spelling's traffic was counted before the migration, and where now."""
    try:
        before: str | None = idna2003_site(raw)
    except SiteError:
        before = None
    now, why = _now(raw)
    return {"spelling": raw, "before": before, "now": now, "refused": why or None}


@app.command("migrate-sites")
def migrate_sites(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    apply: Annotated[
        bool, typer.Option("--apply", help="Record the new site rule, so the cluster starts.")
    ] = False,
    site: Annotated[
        list[str] | None,
        typer.Option(help="Also say where this spelling's traffic was and is counted."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the sites the UTS #46 site rule names differently, then (--apply) adopt it."""
    from flowray.cluster import control  # imports Ray: only for this command

    settings = Settings.from_env(data_dir=data_dir)
    if not settings.data_dir.is_dir():
        fail(f"no data directory {settings.data_dir}")
    stored = control.stored_site_rule(settings.data_dir)
    if stored not in (None, SITE_RULE):
        fail(f"{settings.data_dir} records site rule {stored!r}, which this release does not know")
    old_data = stored is None and control.holds_site_data(settings)
    report = scan(settings)
    report |= {"site_rule": stored or (SITE_RULE_OLD if old_data else None), "rule": SITE_RULE}
    report["lookups"] = [lookup(raw) for raw in site or []]
    if apply and stored is None:
        record = {"site_rule": SITE_RULE, "migrated_ms": int(time.time() * 1000)}
        if old_data:
            reported = len({f["site"] for f in report["findings"]})
            record |= {"migrated_from": SITE_RULE_OLD, "sites_reported": reported}
        write_json_atomic(settings.data_dir / control.SITE_RULE_FILE, record)
    report["applied"] = apply and stored is None
    if as_json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    _print_report(report, apply)


def _print_report(report: dict[str, Any], apply: bool) -> None:
    data_dir, findings = report["data_dir"], report["findings"]
    rule = report["site_rule"]
    state = {None: "holds no site data yet", SITE_RULE: f"uses the site rule {SITE_RULE}"}
    console.print(
        f"{data_dir} {state.get(rule, f'was written with the old site rule ({rule})')}; "
        f"scanned {report['sites_scanned']} site names "
        f"({report['files_scanned']} warehouse files, and the tokens' grants)"
    )
    if findings:
        table = Table(title=f"site names the new rule concerns: {len(findings)}")
        for column in ("site", "spelling", "found in", "what changes"):
            table.add_column(column)
        for f in findings[:FINDINGS_SHOWN]:
            table.add_row(
                f["site"],
                f["spelling"],
                ", ".join(f["found_in"]),
                f"{KINDS[f['kind']]}: {f['why']}",
            )
        console.print(table)
        if len(findings) > FINDINGS_SHOWN:
            console.print(f"... and {len(findings) - FINDINGS_SHOWN} more (see --json)")
        console.print(
            "History written before the migration stays under the stored names: the old "
            "rule kept only the folded name, so traffic spelled another way cannot be told "
            "from the rest and is not moved. From the migration on, those spellings are "
            "counted under their new names: query both names for a site's whole history. "
            "A name whose Unicode spelling is refused now still works in its ASCII form."
        )
    for row in report["lookups"]:
        console.print(_lookup_line(row))
    if report["applied"]:
        console.print(f"recorded: {data_dir} now uses the site rule {SITE_RULE}")
    elif not apply and rule != SITE_RULE:
        console.print(
            "nothing was changed; run again with --apply to record the new site rule "
            "(flowray up refuses a data directory with old data until then)"
        )


def _lookup_line(row: dict[str, Any]) -> str:
    spelling, before, now = row["spelling"], row["before"], row["now"]
    was = f"counted as {before}" if before else "refused"
    if now is None:
        return f"{spelling}: before the migration {was}; refused now: {row['refused']}"
    if now == before:
        return f"{spelling}: counted as {now}, before the migration and after"
    return f"{spelling}: before the migration {was}; from the migration on counted as {now}"
