"""The declared dependency ranges are the ones the test matrix installs."""

from __future__ import annotations

import re
from pathlib import Path

import cipdplugin

REPO_ROOT = Path(__file__).resolve().parents[1]
# Python 3.10 has no tomllib: the two arrays are read with a pattern.
_ARRAY = r"^{name} = \[\n(.*?)^\]"
_REQUIREMENT = re.compile(r'^\s*"([A-Za-z0-9_.\-]+)>=([^,"]+)[^"]*",\s*$')


def _floors(array: str) -> dict[str, str]:
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(_ARRAY.format(name=array), text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"pyproject.toml has no {array} array"
    lines = [
        line for line in match.group(1).splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    floors = {}
    for line in lines:
        requirement = _REQUIREMENT.match(line)
        if requirement is not None:
            floors[requirement.group(1).lower()] = requirement.group(2)
    return floors


def _pins() -> dict[str, str]:
    pins = {}
    for text in (REPO_ROOT / "constraints" / "floor.txt").read_text(encoding="utf-8").splitlines():
        line = text.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_every_runtime_floor_is_pinned_by_the_matrix() -> None:
    floors = _floors("dependencies")
    assert set(floors) == {"grpcio", "protobuf", "googleapis-common-protos", "psutil"}
    pins = _pins()
    assert {name: pins.get(name) for name in floors} == floors


def test_the_test_tools_floors_are_pinned_by_the_matrix() -> None:
    floors = _floors("test")
    assert set(floors) == {"pytest", "pytest-timeout", "hypothesis"}
    pins = _pins()
    assert {name: pins.get(name) for name in floors} == floors


def test_the_version_has_one_home() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "cipdplugin.__version__" }' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", cipdplugin.__version__)


def test_the_licence_is_the_apache_2_0_text() -> None:
    text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
