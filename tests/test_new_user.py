"""The first hour of a new user: the README's instructions and snippets, the
Makefile's environment, the examples' exit statuses and the library's
manners towards an application's logging."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, hex_id, plugin_cmd

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def python_blocks(markdown: str) -> list[str]:
    """The README's Python code blocks (indented ones included), dedented."""
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", markdown, re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(body) for _, body in blocks]


def test_every_python_block_of_the_readme_parses() -> None:
    blocks = python_blocks(README)
    assert len(blocks) >= 6
    for block in blocks:
        ast.parse(block)


def test_readme_snippets_build_the_pins_they_use() -> None:
    for block in python_blocks(README):
        tree = ast.parse(block)
        used = any(
            isinstance(n, ast.Name) and n.id == "pins" and isinstance(n.ctx, ast.Load) for n in ast.walk(tree)
        )
        bound = any(
            (isinstance(n, ast.Name) and n.id == "pins" and isinstance(n.ctx, ast.Store))
            or (isinstance(n, ast.arg) and n.arg == "pins")
            for n in ast.walk(tree)
        )
        assert bound or not used, block


def test_readme_says_how_to_install_and_run_from_a_clone() -> None:
    assert "not published on a package index" in README
    assert "pipx install" in README and "python3 -m venv /opt/cipdplugin" in README
    assert "pip wheel" in README
    # The command-line example is run in the clone's environment.
    example = README.index("$ cipdplugin check --plugin")
    assert "$ . .venv/bin/activate\n" in README[example - 200 : example]
    assert "## Embedding in a deployment script" in README
    assert "signal.signal(signal.SIGTERM" in README and "new_admission_plugin(cmdline)" in README


def test_the_library_stays_quiet_without_logging_configured() -> None:
    # An application that configures no logging sees nothing of a plugin's
    # stderr or log records on its own stderr.
    program = textwrap.dedent(
        """
        import json, sys
        from cipdplugin import Config, Host, Pin, StaticRepository
        with Host(Config("https://cipd.example.com", StaticRepository())) as host:
            plugin = host.new_admission_plugin(json.loads(sys.argv[1]))
            plugin.check_admission(Pin("a/b", "a" * 40)).exception(timeout=60)
        print("done")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program, json.dumps(plugin_cmd("say", json.dumps("plugin says hello")))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
    assert "plugin says hello" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("pins", "status"),
    [
        ([f"ok/tool:{hex_id(1)}"], 0),
        ([f"ok/tool:{hex_id(1)}", f"deny/tool:{hex_id(2)}"], 1),
        ([f"deny/tool:{hex_id(2)}", f"error/tool:{hex_id(3)}"], 3),
        (["Not:a-pin"], 2),
    ],
    ids=["admitted", "denied", "failed", "invalid"],
)
def test_deploy_from_env_exits_as_the_command_line_does(pins: list[str], status: int) -> None:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CIPD_")}
    environment.update(
        {
            "CIPD_ADMISSION_PLUGIN": json.dumps(plugin_cmd("admit")),
            "CIPD_CONFIG_FILE": "-",
            # Never called: the test plugin reads no metadata.
            "CIPD_SERVICE_URL": "http://127.0.0.1:9",
        }
    )
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "deploy_from_env.py"), "--no-auth", *pins],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environment,
        cwd=REPO_ROOT,
    )
    assert done.returncode == status, done.stdout + done.stderr


# -- The Makefile's environment belongs to one interpreter ------------------------


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """The Makefile and the files its stamps depend on, with a .venv made by this Python."""
    if not (REPO_ROOT / "Makefile").exists():
        pytest.skip("the Makefile is not shipped in the sdist: this checks a clone")
    for name in ("Makefile", "pyproject.toml", "setup.cfg"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    venv.create(tmp_path / ".venv", with_pip=False, symlinks=True)
    (tmp_path / ".venv" / ".runtime").touch()
    (tmp_path / ".venv" / ".installed").touch()
    return tmp_path


def make_dry_run(directory: Path, python: str) -> str:
    done = subprocess.run(
        ["make", "-n", "venv", f"PYTHON={python}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=directory,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_venv_made_by_another_python_is_made_again(project_copy: Path) -> None:
    # The interpreter that made .venv (or a venv of the same installation): nothing to do.
    assert "Nothing to be done" in make_dry_run(project_copy, sys.executable)
    # Another one (a stand-in answering as another installation would).
    other = project_copy / "python-other"
    other.write_text('#!/bin/sh\necho "3.99.0 from /opt/other-python"\n', encoding="utf-8")
    other.chmod(0o755)
    plan = make_dry_run(project_copy, str(other))
    assert "3.99.0 from /opt/other-python" in plan and "making it again" in plan
    assert "rm -rf .venv" in plan and f"{other} -m venv .venv" in plan
