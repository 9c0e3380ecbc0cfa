"""The lock files match pyproject.toml, and every install uses them.

``requirements.lock`` (flowray's dependencies) and ``requirements-test.lock`` (plus the
test extra) are made by ``scripts/lock`` for Python 3.11 on Linux x86_64; scripts/setup
and cluster.yaml's nodes install from them and resolve nothing themselves. These tests
fail when pyproject.toml declares a package the lock lacks, or the lock pins a version
outside a declared range: the fix is to run ``scripts/lock``. Pure file reading, no
network.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"
FIX = "run scripts/lock to regenerate the lock files from pyproject.toml"
# The one environment the lock files are resolved for (scripts/lock).
TARGET = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: frozenset[str]


def parse_lock(text: str) -> dict[str, Pin]:
    """name -> pin, from a requirements file of ``name==version --hash=...`` entries;
    anything else (a range, a marker, a URL, an editable) is an error."""
    pins: dict[str, Pin] = {}
    logical = re.sub(r"\\\n", " ", text)  # join continuation lines
    for raw in logical.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        parts = line.split()
        spec, options = parts[0], parts[1:]
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", spec)
        assert match, f"not an exact pin: {raw.strip()!r}"
        hashes = [o.removeprefix("--hash=") for o in options if o.startswith("--hash=")]
        assert len(hashes) == len(options), f"unexpected options in {raw.strip()!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = Pin(match[2], frozenset(hashes))
    return pins


def declared(pyproject: dict, extras: tuple[str, ...]) -> list[Requirement]:
    """What a lock must cover: the dependencies, the given extras, the build system's
    requirements (flowray is built without build isolation) and pip."""
    project = pyproject["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    lines += pyproject["build-system"]["requires"]
    lines.append("pip")
    return [Requirement(line) for line in lines]


def problems(requirements: list[Requirement], pins: dict[str, Pin]) -> list[str]:
    """Why ``pins`` does not satisfy ``requirements`` in the target environment."""
    found = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate(TARGET):
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            found.append(f"{req} is declared but not locked")
        elif not req.specifier.contains(Version(pin.version), prereleases=True):
            found.append(f"{req} is declared but {req.name}=={pin.version} is locked")
    return found


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = {"requirements.lock": ((), RUNTIME_LOCK), "requirements-test.lock": (("test",), TEST_LOCK)}


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_lock_covers_pyproject(name: str) -> None:
    extras, path = LOCKS[name]
    assert path.is_file(), f"{name} is missing; {FIX}"
    pins = parse_lock(path.read_text())
    found = problems(declared(PYPROJECT, extras), pins)
    assert not found, f"{name} does not match pyproject.toml; {FIX}:\n" + "\n".join(found)


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_every_pin_is_exact_with_hashes(name: str) -> None:
    pins = parse_lock(LOCKS[name][1].read_text())
    assert len(pins) > 20, f"{name} pins only {sorted(pins)}; {FIX}"
    unhashed = sorted(n for n, pin in pins.items() if not pin.hashes)
    assert not unhashed, f"{name} pins these without hashes: {unhashed}; {FIX}"
    for pin in pins.values():
        Version(pin.version)  # a real version, not a wildcard


def test_linters_and_type_checker_are_pinned() -> None:
    """scripts/test runs ruff format --check and mypy: their versions must not drift."""
    pins = parse_lock(TEST_LOCK.read_text())
    for tool in ("ruff", "mypy", "pytest"):
        assert tool in pins, f"requirements-test.lock does not pin {tool}; {FIX}"


def test_the_two_locks_agree() -> None:
    """Every package of the runtime lock is in the test lock, at the same version, so a
    test run checks the versions the cluster runs."""
    runtime = parse_lock(RUNTIME_LOCK.read_text())
    test = parse_lock(TEST_LOCK.read_text())
    differ = [
        f"{n}: {pin.version} vs {test[n].version if n in test else 'absent'}"
        for n, pin in sorted(runtime.items())
        if n not in test or test[n] != pin
    ]
    assert not differ, f"the lock files disagree; {FIX}:\n" + "\n".join(differ)


def test_the_check_catches_a_missing_or_out_of_range_package() -> None:
    pins = parse_lock(TEST_LOCK.read_text())
    reqs = [Requirement(f"{name}>={pins[name].version}") for name in ("duckdb", "pyarrow", "ruff")]
    assert problems(reqs, pins) == []
    # A package added to pyproject.toml but not locked.
    assert problems([*reqs, Requirement("not-a-locked-package>=1")], pins) == [
        "not-a-locked-package>=1 is declared but not locked"
    ]
    # A range moved past the locked version.
    duckdb = Version(pins["duckdb"].version)
    raised = Requirement(f"duckdb>={duckdb.major + 1}")
    assert problems([raised], pins) == [f"{raised} is declared but duckdb=={duckdb} is locked"]
    # A requirement for another platform or Python does not need to be locked.
    assert problems([Requirement("pywin32>=300; sys_platform == 'win32'")], pins) == []
    assert problems([Requirement("tomli>=2; python_version < '3.11'")], pins) == []


def test_parse_lock_refuses_a_loose_pin() -> None:
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_lock("duckdb>=1.1 \\\n    --hash=sha256:00\n")
    assert parse_lock("# header\nDuck_DB==1.2.0 \\\n    --hash=sha256:ab\n    # via x\n") == {
        "duck-db": Pin("1.2.0", frozenset({"sha256:ab"}))
    }


def test_installs_use_the_locks() -> None:
    """scripts/setup (hence scripts/up and scripts/test) and every cluster node install
    from the lock files, with hashes, resolving nothing."""
    setup = (ROOT / "scripts" / "setup").read_text()
    for lock in ("requirements.lock", "requirements-test.lock"):
        assert lock in setup, f"scripts/setup does not install from {lock}"
    assert "--require-hashes --no-deps -r" in setup
    commands = yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"]
    assert any(
        "pip install --require-hashes --no-deps -r /home/ubuntu/flowray/requirements.lock" in c
        for c in commands
    ), "cluster.yaml's setup_commands must install from requirements.lock"
