"""The audit log under hostile text, failing sinks, full disks and FIFOs.

A decision record must never be lost or torn: every test here counts the
lines and parses each one, with real plugins, real files and real FIFOs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cipdplugin import Config, Host, Pin, StaticRepository
from cipdplugin.host.audit import AuditLog, format_line, valid_text
from tests.conftest import (
    REPO_ROOT,
    SERVICE_URL,
    TEST_PLUGIN,
    Records,
    hex_id,
    plugin_cmd,
)

#: Everything a line-splitting reader may split on, and what a terminal acts on.
HOSTILE = "a\nb\rc\x85d\u2028e\u2029f\x9b31m\x1b]0;owned\x07g\x7fh\x00i\x1c\x1d\x1ej\tk"
LOST = re.compile(r"(\d+) of (\d+) records were not written")


def lines_of(path: Path) -> list[str]:
    """The log's lines as any reader splits them: every separator Python knows."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the last line is torn"
    assert all(32 <= byte < 127 for byte in data.replace(b"\n", b"")), "not printable ASCII"
    return data.decode("ascii").splitlines()


def lost_in(messages: list[str]) -> int:
    """How many records the ERROR lines say were lost."""
    return sum(int(match.group(1)) for text in messages for match in [LOST.search(text)] if match)


def errors(records: Records) -> list[str]:
    return [text for level, text in records.messages() if level >= logging.ERROR]


def say_cmd(text: str) -> list[str]:
    return plugin_cmd("say", json.dumps(text))


# -- Any text is one line, and read back exactly ------------------------------


def test_any_text_is_one_line_and_read_back_exactly(make_host: Callable[..., Host], tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    host = make_host(audit_log=str(path))
    plugin = host.new_admission_plugin(say_cmd(HOSTILE))
    futures = [plugin.check_admission(Pin("a/b", hex_id(n))) for n in range(8)]
    for future in futures:
        assert future.exception(timeout=60) is not None
    host.close()
    lines = lines_of(path)
    assert len(lines) == 8
    assert all(json.loads(line)["message"] == HOSTILE for line in lines)


def test_format_line_escapes_everything_outside_printable_ascii() -> None:
    line = format_line({"message": HOSTILE + "é\U0001f600"})
    assert line.endswith("\n") and line.count("\n") == 1
    assert all(32 <= ord(char) < 127 for char in line[:-1])
    assert json.loads(line)["message"] == HOSTILE + "é\U0001f600"


def test_text_that_is_not_unicode_is_spelt_out() -> None:
    assert valid_text("plugin-\udcff.py") == "plugin-\\xff.py"
    assert valid_text("x\ud800y") == "x\\ud800y"
    assert valid_text("plain") == "plain"


def test_a_plugin_named_with_bytes_that_are_not_utf8(make_host: Callable[..., Host], tmp_path: Path) -> None:
    # A script whose file name is not UTF-8 runs the test plugin: its name in
    # the log comes from the file name. Another plugin shares the log.
    script = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"plugin-\xff\xfe.py"))
    Path(script).write_text(
        f"import runpy, sys\nsys.argv[0] = {str(TEST_PLUGIN)!r}\n"
        f"runpy.run_path({str(TEST_PLUGIN)!r}, run_name='__main__')\n",
        encoding="utf-8",
    )
    path = tmp_path / "audit.jsonl"
    host = make_host(audit_log=str(path))
    odd = host.new_admission_plugin([sys.executable, script, "admit"])
    plain = host.new_admission_plugin(plugin_cmd("admit"))
    futures = [p.check_admission(Pin("ok/a", hex_id(n))) for p in (odd, plain) for n in range(30)]
    for future in futures:
        assert future.result(timeout=60) is None
    host.close()
    records = [json.loads(line) for line in lines_of(path)]
    assert len(records) == 60
    names = {record["plugin"] for record in records}
    assert names == {"plugin-\\xff\\xfe.py", plain.name}


# -- One failure costs only itself ---------------------------------------------


def test_a_callable_raising_on_some_records_gets_all_the_others(
    make_host: Callable[..., Host], records: Records
) -> None:
    received: list[dict[str, Any]] = []
    refused: list[str] = []

    def sink(record: dict[str, Any]) -> None:
        if int(record["instance_id"], 16) % 7 == 0:
            refused.append(record["instance_id"])
            raise RuntimeError("this sink refuses every seventh record")
        received.append(record)

    host = make_host(audit_log=sink, logger=records.logger)
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    futures = [plugin.check_admission(Pin("ok/a", hex_id(n))) for n in range(199)]
    for future in futures:
        assert future.result(timeout=60) is None
    host.close()
    expected_refused = sum(1 for n in range(199) if n % 7 == 0)
    assert len(refused) == expected_refused
    assert sorted(int(r["instance_id"], 16) for r in received) == [n for n in range(199) if n % 7]
    assert lost_in(errors(records)) == expected_refused


class FlakyStream(io.StringIO):
    """A stream whose write fails for lines holding ``bad``."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    def write(self, text: str) -> int:
        if self.bad in text:
            raise OSError(5, "Input/output error")
        return super().write(text)


def test_a_stream_failing_on_one_record_gets_all_the_others(
    make_host: Callable[..., Host], records: Records
) -> None:
    stream = FlakyStream(hex_id(3))
    host = make_host(audit_log=stream, logger=records.logger)
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    for future in [plugin.check_admission(Pin("ok/a", hex_id(n))) for n in range(50)]:
        future.result(timeout=60)
    host.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 49
    assert hex_id(3) not in stream.getvalue()
    assert lost_in(errors(records)) == 1


def test_a_record_that_cannot_be_formatted_costs_only_itself(records: Records) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    received: list[dict[str, Any]] = []
    audit = AuditLog(received.append, logger=records.logger)
    for n in range(10):
        outcome = Unprintable() if n == 4 else None
        audit.record_check(
            Pin("ok/a", hex_id(n)), outcome, plugin="p", plugin_version="1", service_url="", enqueued=0.0
        )
    audit.close()
    assert [r["instance_id"] for r in received] == [hex_id(n) for n in range(10) if n != 4]
    assert lost_in(errors(records)) == 1


def test_a_device_that_refuses_every_write_reports_the_true_count(
    make_host: Callable[..., Host], records: Records
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    host = make_host(audit_log="/dev/full", logger=records.logger)
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    futures = [plugin.check_admission(Pin("ok/a", hex_id(n))) for n in range(150)]
    for future in futures:
        assert future.result(timeout=60) is None  # no verdict changes
    host.close()
    assert lost_in(errors(records)) == 150


# -- Whole records or none: a file size limit plays the full disk ---------------

FULL_DISK_PROGRAM = textwrap.dedent(
    """
    import json, logging, os, resource, sys, time
    from cipdplugin import Config, Host, Pin, StaticRepository

    path, plugin_cmd = sys.argv[1], json.loads(sys.argv[2])
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                messages.append(record.getMessage())

    logger = logging.getLogger("full-disk")
    logger.addHandler(Keep())
    logger.propagate = False

    def wait_for(predicate):
        deadline = time.monotonic() + 60
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.02)

    def check(plugin, numbers):
        futures = [plugin.check_admission(Pin("ok/a", f"{n:040x}")) for n in numbers]
        return [future.exception(timeout=60) is None for future in futures]

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    admitted = []
    with Host(Config("https://cipd.example.com", StaticRepository()), audit_log=path, logger=logger) as host:
        plugin = host.new_admission_plugin(plugin_cmd)
        # The plugin starts, and one record is written, before the disk fills.
        admitted += check(plugin, [0])
        wait_for(lambda: os.path.getsize(path) > 0)
        # One byte of room: the next write stops inside its first record.
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 1, hard))
        admitted += check(plugin, range(1, 101))
        wait_for(lambda: messages)
        # Space is free again.
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        admitted += check(plugin, range(101, 201))
    print(json.dumps({"admitted": admitted, "messages": messages}))
    """
)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_that_frees_up_leaves_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_PROGRAM, str(path), json.dumps(plugin_cmd("admit"))],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["admitted"] == [True] * 201  # a failing log changes no verdict
    records = [json.loads(line) for line in lines_of(path)]
    lost = lost_in(report["messages"])
    assert lost >= 1
    assert len(records) == 201 - lost
    assert any("was removed" in message for message in report["messages"]), report["messages"]
    # Records from after the disk freed up are all there.
    written = {int(record["instance_id"], 16) for record in records}
    assert set(range(101, 201)) <= written
    assert 0 in written


# -- Opening never hangs ---------------------------------------------------------

OPEN_PROGRAM = textwrap.dedent(
    """
    import sys
    from cipdplugin import Host
    try:
        Host(audit_log=sys.argv[1]).close()
    except OSError as exc:
        print(f"OSError: {exc}")
    except ValueError as exc:
        print(f"ValueError: {exc}")
    else:
        print("opened")
    """
)


def open_in_a_child(path: Path) -> str:
    """What ``Host(audit_log=path)`` does, in a child that must not hang."""
    done = subprocess.run(
        [sys.executable, "-c", OPEN_PROGRAM, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO_ROOT,
    )
    return done.stdout.strip()


def test_a_fifo_nothing_reads_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    outcome = open_in_a_child(fifo)
    assert outcome.startswith("OSError:"), outcome
    assert "FIFO" in outcome and "nothing reads" in outcome


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert open_in_a_child(tmp_path).startswith("OSError:")


def test_a_fifo_that_is_read_gets_every_record(make_host: Callable[..., Host], tmp_path: Path) -> None:
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    # Opened for reading first (without waiting for a writer), as a log collector would.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(reader, True)
    received = bytearray()

    def collect() -> None:
        while chunk := os.read(reader, 65536):  # ends at EOF: the host closes its end
            received.extend(chunk)

    collector = threading.Thread(target=collect, daemon=True)
    try:
        host = make_host(audit_log=str(fifo))
        # Now that the host holds the writing end: a FIFO without a writer reads as EOF.
        collector.start()
        plugin = host.new_admission_plugin(plugin_cmd("admit"))
        for future in [plugin.check_admission(Pin("ok/a", hex_id(n))) for n in range(40)]:
            future.result(timeout=60)
        host.close()
        collector.join(30)
        assert not collector.is_alive()
    finally:
        os.close(reader)
    lines = bytes(received).decode("ascii").splitlines()
    assert len(lines) == 40
    assert {json.loads(line)["instance_id"] for line in lines} == {hex_id(n) for n in range(40)}


def test_a_hung_sink_is_given_up_with_the_count(make_host: Callable[..., Host], records: Records) -> None:
    release = threading.Event()
    host = make_host(audit_log=lambda record: release.wait(60), logger=records.logger)
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    for future in [plugin.check_admission(Pin("ok/a", hex_id(n))) for n in range(5)]:
        future.result(timeout=60)
    host.close(timeout=1.0)
    release.set()
    given_up = [text for text in errors(records) if "giving up" in text]
    assert given_up and re.search(r"giving up on the [1-5] records", given_up[0]), given_up


def test_the_cli_refuses_a_fifo_nothing_reads(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CIPD_")}
    environment["CIPD_CONFIG_FILE"] = "-"
    done = subprocess.run(
        [
            *[sys.executable, "-m", "cipdplugin", "check", "--timeout", "3"],
            *["--plugin", json.dumps(plugin_cmd("admit")), "--audit-log", str(fifo), f"ok/a:{hex_id(1)}"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert "nothing reads" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq")
def test_jq_reads_every_record(make_host: Callable[..., Host], tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    host = make_host(Config(SERVICE_URL, StaticRepository()), audit_log=str(path))
    plugin = host.new_admission_plugin(say_cmd(HOSTILE))
    for future in [plugin.check_admission(Pin("a/b", hex_id(n))) for n in range(5)]:
        future.exception(timeout=60)
    host.close()
    with path.open("rb") as log:
        done = subprocess.run(
            ["jq", "-c", ".message"], stdin=log, capture_output=True, timeout=60, check=False
        )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 5
