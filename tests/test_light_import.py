"""A plugin imports only the plugin side; the top-level names load on first use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cipdplugin

#: Modules a plugin never uses: the host side, the command line, process tools.
HOST_ONLY = ("psutil", "cipdplugin.host", "cipdplugin.cli")


def _modules_after(statement: str) -> set[str]:
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(result.stdout))


def _host_only(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HOST_ONLY))


@pytest.mark.parametrize(
    "statement",
    [
        "import cipdplugin.plugins.admission",
        "from cipdplugin.plugins import admission",
        "import cipdplugin",
        "from cipdplugin import Pin, ObjectRef, AdmissionDenied",
    ],
)
def test_the_plugin_side_does_not_import_the_host_side(statement: str) -> None:
    assert _host_only(_modules_after(statement)) == []


def test_the_check_can_fail() -> None:
    # The check above must be able to see the host side when it is imported.
    assert _host_only(_modules_after("from cipdplugin import Host")) != []


def test_every_export_resolves_to_its_definition() -> None:
    for name, module in cipdplugin._EXPORTS.items():
        value = getattr(cipdplugin, name)
        assert value is getattr(sys.modules[module], name)


def test_all_lists_exactly_the_exports() -> None:
    assert sorted(cipdplugin.__all__) == sorted(cipdplugin._EXPORTS)


def test_dir_shows_exports_before_they_load() -> None:
    script = "import json, cipdplugin\nprint(json.dumps(dir(cipdplugin)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    names = set(json.loads(result.stdout))
    assert set(cipdplugin.__all__) <= names
    assert "__version__" in names
    assert not {"importlib", "Any", "TYPE_CHECKING"} & names


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        cipdplugin.no_such_name  # noqa: B018
    assert not hasattr(cipdplugin, "no_such_name")
