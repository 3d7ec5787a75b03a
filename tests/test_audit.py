"""The decision audit log: fields, sinks, failures, and many plugins writing at once."""

from __future__ import annotations

import calendar
import io
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from cipdplugin import AdmissionDenied, Config, Host, Pin, StaticRepository
from cipdplugin.deadline import Deadline
from cipdplugin.host.audit import AuditLog, format_timestamp
from cipdplugin.host.checks import AdmissionChecks, Check
from cipdplugin.protocol import plugin_pb2
from tests.conftest import SERVICE_URL, ResourceSnapshot, assert_no_leaks, hex_id, plugin_cmd, wait_until

FIELDS = [
    "ts",
    "pin",
    "package",
    "instance_id",
    "verdict",
    "code",
    "message",
    "plugin",
    "plugin_version",
    "service_url",
    "latency_ms",
    "enforced",
    "host_pid",
]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def read_log(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "the last line is torn"
    return [json.loads(line) for line in text.splitlines()]


def test_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    assert format_timestamp(1795846500.1239) == "2026-11-28T06:15:00.123Z"
    assert format_timestamp(0.0) == "1970-01-01T00:00:00.000Z"


def test_every_field_of_each_verdict(make_host: Callable[..., Host], tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    host = make_host(audit_log=str(path))
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    pins = {
        "admitted": Pin("ok/tool", hex_id(1)),
        "denied": Pin("deny/tool", hex_id(2)),
        "error": Pin("error/tool", hex_id(3)),
    }
    started = time.time()
    for future in [plugin.check_admission(p) for p in pins.values()]:
        future.exception(timeout=30)
    host.close()
    records = {record["verdict"]: record for record in read_log(path)}
    assert set(records) == set(pins)
    for verdict, record in records.items():
        assert list(record) == FIELDS
        assert TIMESTAMP.match(record["ts"]), record["ts"]
        stamp = calendar.timegm(time.strptime(record["ts"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert started - 2 <= stamp <= time.time() + 1  # UTC, and now
        assert record["pin"] == str(pins[verdict])
        assert record["package"] == pins[verdict].package
        assert record["instance_id"] == pins[verdict].instance_id
        assert record["plugin"] == plugin.name
        assert record["plugin_version"] == "test-plugin 1.0"
        assert record["service_url"] == SERVICE_URL
        assert isinstance(record["latency_ms"], float) and record["latency_ms"] > 0
        assert record["enforced"] is True
        assert record["host_pid"] == os.getpid()
    assert (records["admitted"]["code"], records["admitted"]["message"]) == ("OK", "")
    assert (records["denied"]["code"], records["denied"]["message"]) == (
        "FAILED_PRECONDITION",
        "deny/tool is denied",
    )
    assert (records["error"]["code"], records["error"]["message"]) == ("PERMISSION_DENIED", "no access")


def test_one_line_per_check_not_per_cache_hit(make_host: Callable[..., Host], tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    host = make_host(audit_log=path)  # a PathLike works too
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    pin = Pin("ok/tool", hex_id(1))
    for _ in range(5):
        plugin.check_admission(pin).result(timeout=30)
    plugin.clear_cache()
    plugin.check_admission(pin).result(timeout=30)
    host.close()
    assert [record["pin"] for record in read_log(path)] == [str(pin), str(pin)]


def test_the_path_is_appended_to(make_host: Callable[..., Host], tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": "run"}\n', encoding="utf-8")
    host = make_host(audit_log=str(path))
    host.new_admission_plugin(plugin_cmd("admit")).check_admission(Pin("ok/a", hex_id(1))).result(timeout=30)
    host.close()
    records = read_log(path)
    assert records[0] == {"earlier": "run"}
    assert [r["verdict"] for r in records[1:]] == ["admitted"]


def test_enforce_false_only_sets_the_field(make_host: Callable[..., Host]) -> None:
    records: list[dict[str, Any]] = []
    host = make_host(audit_log=records.append, enforce=False)
    assert host.enforce is False
    error = (
        host.new_admission_plugin(plugin_cmd("admit")).check_admission(Pin("deny/a", hex_id(1))).exception(30)
    )
    assert error is not None  # still a denial for the caller
    host.close()
    assert [(r["verdict"], r["enforced"]) for r in records] == [("denied", False)]


def test_failures_to_start_and_closed_plugins_are_recorded(make_host: Callable[..., Host]) -> None:
    records: list[dict[str, Any]] = []
    host = make_host(audit_log=records.append)
    missing = host.new_admission_plugin(["/nonexistent/plugin"])
    missing.check_admission(Pin("a/b", hex_id(1))).exception(timeout=30)
    stuck = host.new_admission_plugin(plugin_cmd("stuck-handler"))
    pending = stuck.check_admission(Pin("a/b", hex_id(2)))
    host.close()
    assert pending.done()
    assert sorted((r["plugin"], r["verdict"], r["code"]) for r in records) == sorted(
        [("plugin", "error", "UNAVAILABLE"), (stuck.name, "error", "ABORTED")]
    )


def test_the_callable_sees_dicts_one_at_a_time(make_host: Callable[..., Host]) -> None:
    inside = 0
    overlaps = 0
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(record: dict[str, Any]) -> None:
        nonlocal inside, overlaps
        with lock:
            inside += 1
            overlaps += inside > 1
        time.sleep(0.001)
        with lock:
            inside -= 1
        records.append(record)

    host = make_host(audit_log=sink)
    plugins = [host.new_admission_plugin(plugin_cmd("admit")) for _ in range(3)]
    futures = [plugins[i % 3].check_admission(Pin("ok/a", hex_id(i))) for i in range(60)]
    for future in futures:
        future.result(timeout=30)
    host.close()
    assert len(records) == 60 and overlaps == 0
    assert all(list(record) == FIELDS for record in records)


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_failing_sink_never_changes_a_verdict(
    make_host: Callable[..., Host], caplog: pytest.LogCaptureFixture
) -> None:
    def raising(record: dict[str, Any]) -> None:
        raise RuntimeError("sink is broken")

    for sink in (BrokenStream(), raising):
        caplog.clear()
        host = make_host(audit_log=sink)
        plugin = host.new_admission_plugin(plugin_cmd("admit"))
        assert plugin.check_admission(Pin("ok/a", hex_id(1))).result(timeout=30) is None
        assert plugin.check_admission(Pin("deny/a", hex_id(2))).exception(timeout=30) is not None
        host.close()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and "audit log" in r.getMessage()]
        assert errors, f"no ERROR logged for {sink!r}"


def test_a_stuck_sink_never_blocks_a_verdict(make_host: Callable[..., Host]) -> None:
    release = threading.Event()
    written: list[dict[str, Any]] = []

    def stuck(record: dict[str, Any]) -> None:
        release.wait(30)
        written.append(record)

    host = make_host(audit_log=stuck)
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    futures = [plugin.check_admission(Pin("ok/a", hex_id(i))) for i in range(20)]
    for future in futures:
        assert future.result(timeout=30) is None  # answered while the sink hangs
    assert written == []
    release.set()
    host.close()
    assert len(written) == 20


def test_host_close_bounds_a_hung_sink(
    make_host: Callable[..., Host], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    host = make_host(audit_log=lambda record: release.wait(60))
    host.new_admission_plugin(plugin_cmd("admit")).check_admission(Pin("ok/a", hex_id(1))).result(timeout=30)
    started = time.monotonic()
    host.close(timeout=1.0)
    assert time.monotonic() - started < 5.0  # generous: the bound is the point
    assert any("giving up" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    release.set()


def test_the_stream_is_flushed_and_left_open(make_host: Callable[..., Host], tmp_path: Path) -> None:
    path = tmp_path / "stream.jsonl"
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as stream:
        host = make_host(audit_log=stream)
        host.new_admission_plugin(plugin_cmd("admit")).check_admission(Pin("ok/a", hex_id(1))).result(
            timeout=30
        )
        host.close()
        assert not stream.closed
        assert len(read_log(path)) == 1  # flushed, although the buffer is large


def test_invalid_targets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="audit_log"):
        Host(audit_log=42)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        Host(audit_log=str(tmp_path / "missing-dir" / "audit.jsonl"))


def test_no_thread_or_descriptor_outlives_close(tmp_path: Path) -> None:
    before = ResourceSnapshot()
    with Host(Config(SERVICE_URL), audit_log=str(tmp_path / "a.jsonl")) as host:
        plugin = host.new_admission_plugin(plugin_cmd("admit"), check_timeout=30)
        plugin.check_admission(Pin("ok/a", hex_id(1))).result(timeout=30)
    assert_no_leaks(before)


def test_stress_8_plugins_2000_checks_each_every_check_exactly_once(tmp_path: Path) -> None:
    plugins_count, checks = 8, 2000
    path = tmp_path / "audit.jsonl"
    expected: Counter[tuple[str, str]] = Counter()
    with Host(Config(SERVICE_URL, StaticRepository()), audit_log=str(path)) as host:
        plugins = [host.new_admission_plugin(plugin_cmd("admit")) for _ in range(plugins_count)]
        futures: list[list[Future[None]]] = [[] for _ in plugins]

        def submit(index: int) -> None:
            # Each plugin has its own packages: a record's pin says whose it is.
            for n in range(checks):
                package = f"{'deny' if n % 10 == 0 else 'ok'}/plugin-{index}"
                futures[index].append(plugins[index].check_admission(Pin(package, hex_id(n))))

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(plugins_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for index in range(plugins_count):
            for n in range(checks):
                verdict = "denied" if n % 10 == 0 else "admitted"
                expected[(f"{'deny' if n % 10 == 0 else 'ok'}/plugin-{index}:{hex_id(n)}", verdict)] += 1
        for batch in futures:
            for future in batch:
                future.exception(timeout=60)
    # close() has returned: every line is there, whole.
    records = read_log(path)
    assert len(records) == plugins_count * checks
    assert Counter((r["pin"], r["verdict"]) for r in records) == expected
    assert all(list(r) == FIELDS for r in records)


def test_records_are_written_while_the_host_runs(make_host: Callable[..., Host], tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    host = make_host(audit_log=str(path))
    host.new_admission_plugin(plugin_cmd("admit")).check_admission(Pin("ok/a", hex_id(1))).result(timeout=30)
    assert wait_until(lambda: path.read_text(encoding="utf-8").count("\n") == 1)


def test_racing_settlers_record_exactly_the_outcome_that_wins() -> None:
    # An answer and a deadline may settle one check at once: the record must
    # be the one outcome the promise ends with, written once.
    records: list[dict[str, Any]] = []
    audit = AuditLog(records.append, logger=logging.getLogger("cipdplugin"))

    def record(check: Check, outcome: BaseException | None) -> None:
        audit.record_check(
            check.pin, outcome, plugin="p", plugin_version="1", service_url="", enqueued=check.queued_at
        )

    checks = AdmissionChecks(name="p", max_pending=1000, check_timeout=None, on_settling=record)
    futures = []
    for n in range(300):
        admission = plugin_pb2.Admission(admission_id=f"id-{n}", package="ok/a")
        futures.append(checks.add(Pin("ok/a", hex_id(n)), admission, Deadline(None)))
    start = threading.Barrier(2)

    def settle(outcome: BaseException | None) -> None:
        start.wait(10)
        for n in range(len(futures)):
            checks.resolve(f"id-{n}", outcome)

    threads = [
        threading.Thread(target=settle, args=(None,)),
        threading.Thread(target=settle, args=(AdmissionDenied("no"),)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    audit.close()
    assert len(records) == len(futures)
    verdicts = {record["instance_id"]: record["verdict"] for record in records}
    for n, future in enumerate(futures):
        assert verdicts[hex_id(n)] == ("admitted" if future.exception(timeout=0) is None else "denied")
