"""The lifecycle core and what it promises every kind: promises only the
host settles, one close budget, and a transport that knows no kind."""

from __future__ import annotations

import ast
import concurrent.futures
import time
from concurrent.futures import InvalidStateError
from pathlib import Path

import psutil
import pytest

from cipdplugin import AdmissionDenied, PluginAbortedError
from cipdplugin.constants import CLOSE_MARGIN, KILL_DEADLINE
from cipdplugin.host import HostFuture, PluginState
from tests.conftest import (
    REPO_ROOT,
    HostFactory,
    ResourceSnapshot,
    assert_no_leaks,
    pin,
    plugin_cmd,
    wait_until,
)

#: Scheduling slack a busy machine adds to a bounded wait's wake-up.
WAKE_UP_SLACK = 0.2


def test_a_shared_promise_cannot_be_settled_or_cancelled_from_outside(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("stuck-handler"))
    promise = plugin.check_admission(pin(1))
    assert isinstance(promise, concurrent.futures.Future) and isinstance(promise, HostFuture)
    with pytest.raises(InvalidStateError, match="only the host"):
        promise.set_result(None)
    with pytest.raises(InvalidStateError, match="only the host"):
        promise.set_exception(AdmissionDenied("forged by a caller"))
    with pytest.raises(InvalidStateError):
        promise.set_running_or_notify_cancel()
    assert promise.cancel() is False
    assert not promise.done() and not promise.cancelled()
    # Everything a caller does with a Future still works.
    called: list[concurrent.futures.Future[None]] = []
    promise.add_done_callback(called.append)
    with pytest.raises(TimeoutError):  # the builtin, on every supported Python
        promise.result(timeout=0.05)
    with pytest.raises(TimeoutError):
        promise.exception(timeout=0.05)
    _, pending = concurrent.futures.wait([promise], timeout=0.05)
    assert pending == {promise}
    # The same promise for every caller, settled by the host alone.
    assert plugin.check_admission(pin(1)) is promise
    plugin.close()
    assert isinstance(promise.exception(timeout=0), PluginAbortedError)
    assert called == [promise]


def test_settled_promises_cannot_be_overwritten(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    promise = plugin.check_admission(pin(1))
    assert promise.result(timeout=30) is None
    with pytest.raises(InvalidStateError):
        promise.set_exception(AdmissionDenied("too late"))
    assert promise.exception(timeout=0) is None


def test_close_returns_within_the_kill_deadline_plus_the_margin(
    baseline: ResourceSnapshot, make_host: HostFactory, tmp_path: Path
) -> None:
    """A plugin that ignores SIGTERM and never answers, with stubborn
    children, an audit log and check deadlines: one budget for all of it."""
    audit = tmp_path / "audit.jsonl"
    host = make_host(audit_log=str(audit))
    plugin = host.new_admission_plugin(plugin_cmd("hold", "2"), check_timeout=3600)
    checks = [plugin.check_admission(pin(n)) for n in range(20)]
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 30)
    process = plugin.process
    assert process is not None
    # The plugin, its 2 children and their 2 children.
    assert wait_until(lambda: len(_family(process.pid)) >= 5, 30)
    family = _family(process.pid)
    started = time.monotonic()
    host.close()
    elapsed = time.monotonic() - started
    assert elapsed <= KILL_DEADLINE + CLOSE_MARGIN + WAKE_UP_SLACK
    assert elapsed >= KILL_DEADLINE - 0.5  # it did have to wait for SIGKILL
    assert all(isinstance(check.exception(timeout=0), PluginAbortedError) for check in checks)
    assert audit.read_text(encoding="utf-8").count("\n") == len(checks)  # written by the time close returns
    assert wait_until(lambda: not any(_alive(pid) for pid in family), 5)
    assert_no_leaks(baseline)


def test_close_of_one_plugin_has_the_same_bound(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("hold"), check_timeout=3600)
    check = plugin.check_admission(pin(1))
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 30)
    started = time.monotonic()
    plugin.close(timeout=1.0)
    assert time.monotonic() - started <= 1.0 + CLOSE_MARGIN + WAKE_UP_SLACK
    assert isinstance(check.exception(timeout=0), PluginAbortedError)


def test_admission_plugin_is_a_context_manager(make_host: HostFactory) -> None:
    with make_host().new_admission_plugin(plugin_cmd("admit")) as plugin:
        assert plugin.check_admission(pin(1)).result(timeout=30) is None
    assert plugin.state is PluginState.CLOSED
    assert isinstance(plugin.check_admission(pin(2)).exception(timeout=0), PluginAbortedError)


def test_a_crashed_plugin_tells_later_checks_how_to_recover(make_host: HostFactory) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("crash-on-second"))
    assert plugin.check_admission(pin(1)).result(timeout=30) is None
    crashed = plugin.check_admission(pin(2)).exception(timeout=30)
    assert isinstance(crashed, PluginAbortedError) and "while checks were pending" in crashed.message
    later = plugin.check_admission(pin(3)).exception(timeout=0)
    assert isinstance(later, PluginAbortedError)
    assert "checks made since fail at once" in later.message and "new_admission_plugin" in later.message
    # And a new plugin is the way back.
    assert host.new_admission_plugin(plugin_cmd("admit")).check_admission(pin(3)).result(timeout=30) is None


def test_the_transport_imports_no_plugin_kind() -> None:
    """The transport routes calls by the services kinds register: it may not
    import the admission kind (or any other) to do it."""
    source = (REPO_ROOT / "cipdplugin" / "host" / "transport.py").read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.startswith("cipdplugin")}
    assert ours <= {
        "cipdplugin.constants",
        "cipdplugin.deadline",
        "cipdplugin.host.requests",
        "cipdplugin.host.process",
        "cipdplugin.host.promises",
        "cipdplugin.protocol",
        "cipdplugin.threads",
    }, ours


def test_a_second_close_waits_for_the_first(make_host: HostFactory) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("ignore-sigterm"))
    assert plugin.check_admission(pin(1)).result(timeout=30) is None
    first = concurrent.futures.ThreadPoolExecutor(1)
    try:
        closing = first.submit(host.close, 1.0)
        assert wait_until(lambda: host.closed, 5)
        started = time.monotonic()
        host.close()  # waits for the close in progress, which SIGKILLs at 1 s
        waited = time.monotonic() - started
        closing.result(timeout=10)
    finally:
        first.shutdown()
    assert waited <= 1.0 + CLOSE_MARGIN + WAKE_UP_SLACK
    process = plugin.process
    assert process is not None and process.returncode is not None


def _family(pid: int) -> set[int]:
    try:
        return {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
