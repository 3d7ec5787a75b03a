"""Every file the library and the command line read: FIFOs, devices and huge
files are refused at once, naming the file; nothing hangs, nothing runs out
of memory. The command-line cases run the real console script with
``--timeout 3``; each would hang, or die of MemoryError, if read blindly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipdplugin import ConfigError, RepositoryFileError, StaticRepository, load_client_options
from cipdplugin.files import UnusableFile, read_regular_file
from tests.conftest import REPO_ROOT, hex_id, plugin_cmd

PIN = f"ok/tool:{hex_id(1)}"


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO that nothing ever writes: reading it blindly would wait forever."""
    path = tmp_path / "input.fifo"
    os.mkfifo(path)
    yield path


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    """An 80 MiB regular file of small tokens (sparse: it costs no disk)."""
    path = tmp_path / "big"
    with path.open("wb") as f:
        f.write(b"a " * 4096)
        f.truncate(80 * 1024 * 1024)
    return path


def run_in_a_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that must finish (it would hang on a blind read)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )


# -- The helper ---------------------------------------------------------------


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(path, limit=100) == b"x" * 100
    with pytest.raises(UnusableFile, match="larger than 99 bytes"):
        read_regular_file(path, limit=99)


def test_what_is_not_a_regular_file_is_refused_unread(fifo: Path, tmp_path: Path) -> None:
    with pytest.raises(UnusableFile, match="is a FIFO"):
        read_regular_file(fifo, limit=1 << 20)
    with pytest.raises(UnusableFile, match="is a directory"):
        read_regular_file(tmp_path, limit=1 << 20)
    with pytest.raises(UnusableFile, match="is a character device"):
        read_regular_file("/dev/zero", limit=1 << 20)
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "absent", limit=1 << 20)


# -- The CIPD config file ------------------------------------------------------


def config_error(path: Path | str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_client_options({"CIPD_CONFIG_FILE": str(path)})
    return str(caught.value)


def test_a_config_file_that_is_a_fifo_is_an_error_not_a_hang(fifo: Path) -> None:
    done = run_in_a_child(
        """
        import sys
        from cipdplugin import ConfigError, load_client_options
        try:
            load_client_options({"CIPD_CONFIG_FILE": sys.argv[1]})
        except ConfigError as exc:
            print(exc)
        """,
        str(fifo),
    )
    assert done.returncode == 0, done.stderr
    assert str(fifo) in done.stdout and "is a FIFO (named pipe), not a regular file" in done.stdout


def test_a_config_file_that_is_a_device_is_an_error() -> None:
    message = config_error("/dev/zero")
    assert "'/dev/zero'" in message and "character device" in message


def test_a_huge_config_file_is_an_error_not_a_memory_error(big_file: Path) -> None:
    message = config_error(big_file)
    assert str(big_file) in message and "larger than 1 MiB" in message


def test_a_config_file_of_one_mebibyte_of_small_tokens_parses_or_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "cipd.cfg"
    path.write_text("x: 1\n" * (1024 * 1024 // 5), encoding="utf-8")
    assert load_client_options({"CIPD_CONFIG_FILE": str(path)}).admission_plugin == ()


def test_a_config_file_with_mismatched_brackets_is_an_error(tmp_path: Path) -> None:
    # text_format rejects it; a skip that ignored the stray "}" would load
    # the file with no plugin at all.
    path = tmp_path / "cipd.cfg"
    path.write_text('future_list [ }\nplugins {admission{cmd:"/opt/policy"}}\n]\n', encoding="utf-8")
    message = config_error(path)
    assert f"{path}:1:15" in message


# -- Metadata files ------------------------------------------------------------


def test_a_metadata_file_that_is_a_fifo_is_an_error_not_a_hang(fifo: Path) -> None:
    done = run_in_a_child(
        """
        import sys
        from cipdplugin import RepositoryFileError, StaticRepository
        try:
            StaticRepository.from_file(sys.argv[1])
        except RepositoryFileError as exc:
            print(exc)
        """,
        str(fifo),
    )
    assert done.returncode == 0, done.stderr
    assert str(fifo) in done.stdout and "is a FIFO" in done.stdout


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_metadata_file_that_is_a_device_is_an_error(device: str) -> None:
    with pytest.raises(RepositoryFileError, match=f"'{device}'.*character device"):
        StaticRepository.from_file(device)


def test_a_huge_metadata_file_is_an_error(big_file: Path) -> None:
    with pytest.raises(RepositoryFileError, match="larger than 64 MiB"):
        StaticRepository.from_file(big_file)


# -- The command line ------------------------------------------------------------


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``cipdplugin check --timeout 3`` with the admitting test plugin, no CIPD_* variables."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CIPD_")}
    environment["CIPD_CONFIG_FILE"] = "-"
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cipdplugin", "check", "--timeout", "3", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
        cwd=REPO_ROOT,
    )


PLUGIN = ["--plugin", json.dumps(plugin_cmd("admit"))]


def assert_usage_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    for text in expected:
        assert text in result.stderr


def test_pins_json_naming_a_fifo_is_a_usage_error(fifo: Path) -> None:
    assert_usage_error(run_check(*PLUGIN, "--pins-json", str(fifo)), str(fifo), "is a FIFO")


def test_metadata_naming_a_fifo_is_a_usage_error(fifo: Path) -> None:
    assert_usage_error(run_check(*PLUGIN, "--metadata", str(fifo), PIN), str(fifo), "is a FIFO")


@pytest.mark.parametrize("option", ["--pins-json", "--metadata"])
def test_inputs_naming_dev_zero_are_usage_errors(option: str) -> None:
    assert_usage_error(run_check(*PLUGIN, option, "/dev/zero", PIN), "/dev/zero", "character device")


def test_a_huge_pins_file_is_a_usage_error(big_file: Path) -> None:
    assert_usage_error(run_check(*PLUGIN, "--pins-json", str(big_file)), str(big_file), "larger than 16 MiB")


def test_standard_input_is_bounded_too() -> None:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CIPD_")}
    done = subprocess.run(
        [sys.executable, "-m", "cipdplugin", "check", *PLUGIN, "--pins-json", "-"],
        input=" " * (16 * 1024 * 1024 + 1),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environment, "CIPD_CONFIG_FILE": "-"},
        cwd=REPO_ROOT,
    )
    assert_usage_error(done, "pins from standard input is larger than 16 MiB")


def test_with_plugin_given_the_config_file_is_not_read(fifo: Path, tmp_path: Path) -> None:
    # A config file that would hang the reader (a FIFO) or fail to parse is
    # not the concern of a run that names its plugin.
    broken = tmp_path / "cipd.cfg"
    broken.write_text("plugins {", encoding="utf-8")
    for config in (fifo, broken):
        result = run_check(*PLUGIN, PIN, env={"CIPD_CONFIG_FILE": str(config)})
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("admitted")
    # Without --plugin, the file is the plugin's source, and must be usable.
    result = run_check(PIN, env={"CIPD_CONFIG_FILE": str(fifo)})
    assert_usage_error(result, str(fifo), "is a FIFO")
