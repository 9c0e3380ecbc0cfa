"""Moving a data directory from the old site rule (IDNA 2003) to UTS #46 (issue 24).

A data directory records the rule its site names were made with (site_rule.json); one
that holds data but no record was written by the old rule, and starting on it is
refused until `flowray migrate-sites --apply`. The command reports the stored names a
spelling the new rule names differently may have been folded into; nothing is moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from flowray.api.auth import TokenStore
from flowray.cli import app as cli_app
from flowray.cli.migrate import classify, idna2003_site, lookup
from flowray.cluster.control import (
    SITE_RULE_FILE,
    LayoutError,
    SiteRuleError,
    holds_site_data,
    settle_layout,
)
from flowray.config import Settings
from flowray.core.router import SITE_RULE, normalize_site
from flowray.warehouse.files import unit_path, write_unit

LAYOUT = {"groups": 2, "replicas": 3, "shards": 8, "base_groups": 2}


def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, groups=2, replicas=3, shards=8)


def old_data_dir(root: Path, sites: list[str]) -> Path:
    """A data directory as the old release left it: a layout, no site rule, and a
    warehouse unit holding ``sites`` (written by the warehouse's own writer)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "layout.json").write_text(json.dumps(LAYOUT))
    rows = pa.table(
        {
            "site": sorted(sites),
            "minute": pa.array([0] * len(sites), pa.timestamp("ms", tz="UTC")),
            "count": [1] * len(sites),
        }
    )  # the columns the old release wrote
    write_unit(unit_path(root / "warehouse", "default", 1, 440_000, "old"), rows)
    return root


def migrate(*args: str) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(cli_app, ["migrate-sites", *args, "--json"])
    assert result.exit_code == 0, result.output
    report: dict = json.loads(result.stdout)  # type: ignore[type-arg]
    return report


# --------------------------------------------------------------------------- the record


def test_a_new_data_dir_records_the_rule(tmp_path: Path) -> None:
    settle_layout(settings(tmp_path))
    assert json.loads((tmp_path / SITE_RULE_FILE).read_text()) == {"site_rule": SITE_RULE}
    assert json.loads((tmp_path / "layout.json").read_text()) == LAYOUT  # untouched
    settle_layout(settings(tmp_path))  # and starts again


def test_an_old_data_dir_without_data_just_records_the_rule(tmp_path: Path) -> None:
    (tmp_path / "layout.json").write_text(json.dumps(LAYOUT))
    (tmp_path / "groups/g000/r0/blocks/s65535").mkdir(parents=True)  # seals, no-ops only
    (tmp_path / "groups/g000/r0/blocks/s65535/x.seg").write_bytes(b"")
    assert not holds_site_data(settings(tmp_path))
    settle_layout(settings(tmp_path))
    assert json.loads((tmp_path / SITE_RULE_FILE).read_text())["site_rule"] == SITE_RULE


def test_an_old_data_dir_with_warehouse_data_is_refused(tmp_path: Path) -> None:
    old = old_data_dir(tmp_path / "data", ["fass.de"])
    with pytest.raises(SiteRuleError) as refused:
        settle_layout(settings(old))
    message = str(refused.value)
    assert f"flowray migrate-sites --data-dir {old}" in message and "--apply" in message
    assert "UTS #46" in message and "idna2003" in message
    assert isinstance(refused.value, LayoutError)  # so `flowray up` prints it, no traceback
    assert not (old / SITE_RULE_FILE).exists()  # nothing changed


def test_raw_blocks_of_a_data_shard_count_as_data(tmp_path: Path) -> None:
    (tmp_path / "layout.json").write_text(json.dumps(LAYOUT))
    block = tmp_path / "groups/g001/r2/blocks/s0003/2020-03-14T07.h440000.p0000.seg"
    block.parent.mkdir(parents=True)
    block.write_bytes(b"")
    with pytest.raises(SiteRuleError):
        settle_layout(settings(tmp_path))


def test_a_rule_this_release_does_not_know_is_refused(tmp_path: Path) -> None:
    (tmp_path / SITE_RULE_FILE).write_text(json.dumps({"site_rule": "uts46-v9"}))
    with pytest.raises(SiteRuleError, match="'uts46-v9'"):
        settle_layout(settings(tmp_path))


# --------------------------------------------------------------------------- the command


def test_migrate_reports_then_applies_and_the_cluster_may_start(tmp_path: Path) -> None:
    stored = ["fass.de", "xn--g6h.com", "xn--nxasmq6b.com", "taobao.com", "xn--bcher-kva.de"]
    old = old_data_dir(tmp_path / "data", stored)
    report = migrate("--data-dir", str(old))
    assert report["site_rule"] == "idna2003" and report["rule"] == SITE_RULE
    assert report["sites_scanned"] == len(stored) and report["files_scanned"] == 1
    assert report["applied"] is False and not (old / SITE_RULE_FILE).exists()
    found = {(f["site"], f["kind"]): f for f in report["findings"]}
    assert set(found) == {
        ("xn--g6h.com", "refused"),
        ("xn--nxasmq6b.com", "final_sigma"),
        ("fass.de", "sharp_s"),
    }
    assert found[("fass.de", "sharp_s")]["now"] == "xn--fa-hia.de"
    assert found[("fass.de", "sharp_s")]["found_in"] == ["warehouse"]
    assert report["counts"]["refused"] == 1 and report["counts"]["renamed"] == 0
    with pytest.raises(SiteRuleError):
        settle_layout(settings(old))

    applied = migrate("--data-dir", str(old), "--apply")
    assert applied["applied"] is True
    record = json.loads((old / SITE_RULE_FILE).read_text())
    assert record["site_rule"] == SITE_RULE and record["migrated_from"] == "idna2003"
    assert record["sites_reported"] == 3
    assert settle_layout(settings(old)).base_groups == 2  # starts now
    again = migrate("--data-dir", str(old), "--apply")
    assert again["site_rule"] == SITE_RULE and again["applied"] is False  # nothing to do
    assert json.loads((old / SITE_RULE_FILE).read_text()) == record


def test_the_report_explains_in_words(tmp_path: Path) -> None:
    old = old_data_dir(tmp_path / "data", ["fass.de"])
    result = CliRunner().invoke(
        cli_app, ["migrate-sites", "--data-dir", str(old), "--site", "faß.de"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "was written with the old site rule (idna2003)" in text
    assert "History written before the migration stays under the stored names" in text
    assert "faß.de: before the migration counted as fass.de; from the migration on" in text
    assert "run again with --apply" in text


def test_token_grants_are_stored_names_too(tmp_path: Path) -> None:
    old = old_data_dir(tmp_path / "data", ["taobao.com"])
    _token, record = TokenStore(old / "tokens.sqlite").create("read", ["fass.de"], None, "shop")
    report = migrate("--data-dir", str(old))
    assert [(f["site"], f["found_in"]) for f in report["findings"]] == [
        ("fass.de", [f"token {record.id}"])
    ]


def test_migrate_refuses_a_missing_data_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["migrate-sites", "--data-dir", str(tmp_path / "no")])
    assert result.exit_code == 1
    assert "no data directory" in result.stderr


# --------------------------------------------------------------------------- the analysis


@pytest.mark.parametrize(
    ("stored", "kind", "spelling", "now"),
    [
        ("xn--g6h.com", "refused", "♥.com", None),  # IDNA 2008 has no symbols
        ("xn--e28h.ws", "refused", "😀.ws", None),
        ("xn----0fa.de", "refused", "-ä.de", None),  # a hyphen first in a U-label
        ("fass.de", "sharp_s", "faß.de", "xn--fa-hia.de"),
        ("strasse.de", "sharp_s", "straße.de", "xn--strae-oqa.de"),
        ("xn--nxasmq6b.com", "final_sigma", "βόλος.com", "xn--nxasmm1c.com"),
        ("xn--11b2ezc.in", "joiner", "क्\u200cष.in", "xn--11b2ezcs70k.in"),  # after a virama
        ("xn--mgba3gch31f.ir", "joiner", "ن\u200cامهای.ir", "xn--mgba3gch31fx60k.ir"),
        ("xn--a-vp5e.com", "renamed", "aꭰ.com", "xn--a-28h.com"),  # Cherokee case
        ("xn--a-3bh.com", "renamed", "a\u115f.com", "a.com"),  # a filler ignored now
    ],
)
def test_what_the_old_rule_may_have_folded(
    stored: str, kind: str, spelling: str, now: str | None
) -> None:
    findings = {f.kind: f for f in classify(stored)}
    assert findings[kind].spelling == spelling and findings[kind].now == now
    assert idna2003_site(spelling) == stored  # the old rule did fold it into this name
    if now is not None:
        assert normalize_site(spelling) == now


@pytest.mark.parametrize(
    "stored", ["taobao.com", "xn--bcher-kva.de", "ab.com", "xn--zz.com", "xn--r8jz45g.xn--zckzah"]
)
def test_names_the_new_rule_leaves_alone(stored: str) -> None:
    """Latin letters never take a joiner; a bad A-label is left as the ASCII rule let it."""
    assert classify(stored) == []


@pytest.mark.parametrize(
    ("raw", "before", "now"),
    [
        ("faß.de", "fass.de", "xn--fa-hia.de"),
        ("bücher.de", "xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("😀.ws", "xn--e28h.ws", None),
        ("a\u200db.com", "ab.com", None),
        ("bücher.de。", None, "xn--bcher-kva.de"),
    ],
)
def test_lookup_says_where_a_spelling_was_and_is_counted(
    raw: str, before: str | None, now: str | None
) -> None:
    found = lookup(raw)
    assert (found["before"], found["now"]) == (before, now)
    assert (found["refused"] is None) == (now is not None)
