"""Settings: typed and checked when made, read from FLOWRAY_* variables with errors that
name the variable and what it may be, and carried to the actors as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flowray.config import Settings, allowed_values

VARIABLES = [f"FLOWRAY_{name.upper()}" for name in Settings.model_fields]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting from the shell that runs the tests."""
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"replicas": 2}, r"replicas \(FLOWRAY_REPLICAS\) must be an odd number"),
        ({"batch_events_max": 0}, r"batch_events_max \(FLOWRAY_BATCH_EVENTS_MAX\) .* >= 1"),
        ({"future_skew_s": -1.0}, r"future_skew_s \(FLOWRAY_FUTURE_SKEW_S\) .* >= 0"),
        ({"future_skew_s": math.nan}, r"future_skew_s \(FLOWRAY_FUTURE_SKEW_S\)"),
        ({"tick_s": math.inf}, r"tick_s \(FLOWRAY_TICK_S\)"),
        ({"groups": 9}, r"shards \(FLOWRAY_SHARDS, 8\) must be at least groups"),
        ({"propose_deadline_s": 20.0}, r"propose_deadline_s .* must be below commit_timeout_s"),
        ({"heartbeat_ticks": 10}, r"heartbeat_ticks .* must be below election_ticks"),
        ({"redis_url": "http://x"}, r"redis_url \(FLOWRAY_REDIS_URL\) must be empty or start"),
        ({"logic_modules": "ok.mod, not-a-module"}, r"module names, got not-a-module"),
        ({"namespace": ""}, r"namespace \(FLOWRAY_NAMESPACE\) must be non-empty text"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**overrides).validate()  # type: ignore[arg-type]


def test_the_defaults_are_valid() -> None:
    assert Settings().validate() == Settings()
    assert Settings.from_env() == Settings()


def test_an_unknown_keyword_is_a_type_error() -> None:
    # flowray/cluster/builder.py turns it into "bad flowray args".
    with pytest.raises(TypeError, match="unknown settings: groupz"):
        Settings.from_env(groupz=2)


@pytest.mark.parametrize(
    ("variable", "raw", "words"),
    [
        ("FLOWRAY_PORT", "abc", "an integer 1..65535"),
        ("FLOWRAY_PORT", "70000", "an integer 1..65535"),
        ("FLOWRAY_GATEWAYS", "0", "an integer 1..64"),
        ("FLOWRAY_INGEST_PORT", "-1", "an integer 0..65535"),
        ("FLOWRAY_SHARDS", "2.5", "an integer >= groups"),
        ("FLOWRAY_COMMIT_TIMEOUT_S", "soon", "a number > 0"),
        ("FLOWRAY_SEAL_GRACE_S", "nan", "a number >= 0"),
        ("FLOWRAY_FAULT_INJECTION", "maybe", "true or false (or 1 or 0)"),
        ("FLOWRAY_AUTH", "sometimes", "one of auto, on, off"),
    ],
)
def test_a_bad_variable_is_named_with_what_it_may_be(
    clean_env: pytest.MonkeyPatch, variable: str, raw: str, words: str
) -> None:
    clean_env.setenv(variable, raw)
    with pytest.raises(ValueError) as refused:
        Settings.from_env()
    message = str(refused.value)
    assert variable in message and words in message and repr(raw) in message, message
    assert "\n" not in message, "one line, ready for the CLI to print"


def test_every_setting_that_can_be_wrong_says_so_by_name(clean_env: pytest.MonkeyPatch) -> None:
    """Nonsense in any typed variable is refused, naming it and what it may be."""
    for name, info in Settings.model_fields.items():
        if info.annotation in (str, Path):
            continue  # text and paths take anything (bar the checks above)
        variable = f"FLOWRAY_{name.upper()}"
        clean_env.setenv(variable, "nonsense")
        with pytest.raises(ValueError, match=rf"\({variable}\) must be") as refused:
            Settings.from_env()
        assert allowed_values(name) in str(refused.value)
        clean_env.delenv(variable)


def test_every_broken_rule_is_reported_at_once(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLOWRAY_PORT", "0")
    clean_env.setenv("FLOWRAY_AUTH", "maybe")
    with pytest.raises(ValueError, match="FLOWRAY_PORT.*; auth .*FLOWRAY_AUTH"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("raw", "value"), [("1", True), ("true", True), ("TRUE", True), ("0", False), ("false", False)]
)
def test_booleans_from_the_environment(
    clean_env: pytest.MonkeyPatch, raw: str, value: bool
) -> None:
    clean_env.setenv("FLOWRAY_FAULT_INJECTION", raw)
    assert Settings.from_env().fault_injection is value


def test_fault_injection_still_takes_1() -> None:
    assert Settings(fault_injection=1).fault_injection is True  # type: ignore[arg-type]


def test_variables_come_after_defaults_and_before_overrides(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("FLOWRAY_PORT", "9000")
    clean_env.setenv("FLOWRAY_DATA_DIR", str(tmp_path))
    clean_env.setenv("FLOWRAY_REDIS_URL", "")  # empty is a value: no Redis
    clean_env.setenv("FLOWRAY_SEAL_GRACE_S", "0")
    settings = Settings.from_env(groups=4, shards=None)
    assert (settings.port, settings.groups, settings.shards) == (9000, 4, 8)
    assert settings.data_dir == tmp_path and isinstance(settings.data_dir, Path)
    assert settings.redis_url == "" and settings.seal_grace_s == 0.0
    assert Settings.from_env(port=9001).port == 9001


def test_overrides_of_none_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLOWRAY_PORT", "9000")
    assert Settings.from_env(port=None, data_dir=None).port == 9000
    assert Settings.from_env(port=None, data_dir=None).data_dir == Settings().data_dir


def test_unknown_flowray_variables_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    """Not every FLOWRAY_* variable is a setting: FLOWRAY_TOKEN, FLOWRAY_URL and the
    tests' own are read elsewhere, so an unknown one cannot be an error."""
    clean_env.setenv("FLOWRAY_TOKEN", "secret")
    clean_env.setenv("FLOWRAY_NO_SUCH_SETTING", "1")
    assert Settings.from_env() == Settings()


def test_plain_construction_does_not_read_the_environment(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """Settings made from JSON (an actor's) or by a test are exactly what was given."""
    clean_env.setenv("FLOWRAY_PORT", "9000")
    assert Settings().port == 8000
    assert Settings.from_json({"groups": 1}).port == 8000


def test_json_round_trip(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        groups=3,
        shards=6,
        fault_injection=True,
        auth="on",
        seal_grace_s=0,
        logic_modules="tests.logic_bots",
        warehouse=str(tmp_path / "w"),
    )
    blob = json.loads(json.dumps(settings.to_json()))  # as it travels to an actor
    assert blob["data_dir"] == str(tmp_path) and blob["fault_injection"] is True
    assert Settings.from_json(blob) == settings
    assert Settings.from_json(blob | {"from_a_newer_flowray": 1}) == settings


def test_settings_are_immutable_hashable_and_replaceable() -> None:
    settings = Settings()
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]
    assert hash(settings) == hash(Settings()) and len({settings, Settings()}) == 1
    # A copy with changes (flowray/cluster/control.py makes them) is checked too.
    copy = settings.replace(base_groups=2)
    assert isinstance(copy, Settings) and copy.base_groups == 2 and settings.base_groups == 0
    with pytest.raises(ValueError, match="odd number"):
        settings.replace(replicas=2)


def test_derived_paths() -> None:
    settings = Settings(data_dir=Path("/d"), logic_modules=" a.b, ,c ")
    assert settings.warehouse_dir == Path("/d/warehouse")
    assert settings.replica_dir(1, 2) == Path("/d/groups/g001/r2")
    assert settings.logic_module_names == ("a.b", "c")
    assert Settings(warehouse="/w").warehouse_dir == Path("/w")
