"""The shard layout of a data directory: fixed shards and replicas, groups may grow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowray.cluster.control import LayoutError, settle_layout
from flowray.config import Settings


def settings(tmp_path: Path, **values: int) -> Settings:
    return Settings(data_dir=tmp_path, **values)  # type: ignore[arg-type]


def test_the_first_up_fixes_the_layout(tmp_path: Path) -> None:
    first = settle_layout(settings(tmp_path, groups=2, replicas=3, shards=8))
    assert first.base_groups == 2
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert layout == {"groups": 2, "replicas": 3, "shards": 8, "base_groups": 2}
    again = settle_layout(settings(tmp_path, groups=2, replicas=3, shards=8))
    assert again.base_groups == 2 and again.base_map() == first.base_map()


def test_groups_can_be_added_and_start_without_shards(tmp_path: Path) -> None:
    settle_layout(settings(tmp_path, groups=2, replicas=3, shards=8))
    grown = settle_layout(settings(tmp_path, groups=4, replicas=3, shards=8))
    assert (grown.groups, grown.base_groups) == (4, 2)
    assert grown.base_map().owners == (0, 1, 0, 1, 0, 1, 0, 1)  # groups 2 and 3: none yet
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert layout == {"groups": 4, "replicas": 3, "shards": 8, "base_groups": 2}


@pytest.mark.parametrize(
    "values",
    [
        {"groups": 1, "replicas": 3, "shards": 8},  # removing a group would orphan its log
        {"groups": 2, "replicas": 5, "shards": 8},
        {"groups": 2, "replicas": 3, "shards": 16},  # sites would change shards
    ],
)
def test_other_changes_are_refused(tmp_path: Path, values: dict[str, int]) -> None:
    settle_layout(settings(tmp_path, groups=2, replicas=3, shards=8))
    with pytest.raises(LayoutError, match="holds data made with groups=2"):
        settle_layout(settings(tmp_path, **values))


def test_a_layout_from_before_base_groups_keeps_its_map(tmp_path: Path) -> None:
    (tmp_path / "layout.json").write_text(json.dumps({"groups": 2, "replicas": 3, "shards": 8}))
    grown = settle_layout(settings(tmp_path, groups=3, replicas=3, shards=8))
    assert grown.base_groups == 2
