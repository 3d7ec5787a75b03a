"""Plugins that fail in every way we know of, and a host that dies.

Each test shows what the library promises for one fault: every check
resolves with the right error, ``close()`` returns promptly, and nothing
(thread, descriptor, process, zombie) is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import psutil
import pytest

from cipdplugin import (
    AdmissionError,
    Config,
    Host,
    PluginAbortedError,
    PluginProcess,
    PluginStartError,
    StaticRepository,
)
from cipdplugin.host import PluginState
from cipdplugin.host import process as process_module
from tests.conftest import (
    REPO_ROOT,
    SERVICE_URL,
    ResourceSnapshot,
    assert_no_leaks,
    hex_id,
    plugin_cmd,
    wait_until,
    zombies,
)

HOSTILE_PLUGIN = REPO_ROOT / "tests" / "plugins" / "hostile.py"
#: What "promptly" means for a close: the termination deadline, or the
#: SIGTERM grace when the plugin honours it, plus a margin for a busy machine.
CLOSE_MARGIN = 2.0

HostFactory = Callable[..., Host]


def hostile_cmd(mode: str, *args: str) -> list[str]:
    return [sys.executable, str(HOSTILE_PLUGIN), mode, *args]


def pin(n: int, package: str = "test/pkg") -> str:
    return f"{package}:{hex_id(n)}"


_warmed_up = False


def resource_baseline() -> ResourceSnapshot:
    """Resources in use now, after one full host cycle has run in this process.

    gRPC sets up process-wide resources (threads, descriptors) on first
    use and keeps them; only what a host adds after that is a leak.
    """
    global _warmed_up
    if not _warmed_up:
        with Host(Config(SERVICE_URL, StaticRepository())) as host:
            host.new_admission_plugin(plugin_cmd("admit")).check_admission(pin(0)).result(60)
        _warmed_up = True
    return ResourceSnapshot()


def assert_all_gone(pids: set[int], timeout: float = 5.0) -> None:
    """Every pid has exited: gone, or a zombie left to init (not our child)."""

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert wait_until(lambda: not any(running(pid) for pid in pids), timeout), [
        pid for pid in pids if running(pid)
    ]
    assert not zombies()


def plugin_pids(marker: str) -> set[int]:
    """Pids of our descendants whose command line contains ``marker``."""
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if any(marker in part for part in process.cmdline()):
                found.add(process.pid)
        except psutil.Error:
            pass
    return found


def timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


class ExitRecorder:
    """A minimal plugin controller for ``Host.launch_plugin``: records the exit."""

    def __init__(self) -> None:
        self.exited = threading.Event()
        self.process: PluginProcess | None = None

    def plugin_exited(self, process: PluginProcess) -> None:
        self.process = process
        self.exited.set()


# -- Cannot start --------------------------------------------------------------


def test_plugin_not_found(make_host: HostFactory, tmp_path: Path) -> None:
    before = resource_baseline()
    host = make_host()
    missing = str(tmp_path / "no-such-plugin")
    plugin = host.new_admission_plugin([missing, "--flag"])
    error = plugin.check_admission(pin(1)).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert missing in error.message
    assert "No such file" in error.message
    # Broken for good: later checks fail at once with the same error.
    assert plugin.check_admission(pin(2)).exception(timeout=1) is error
    assert plugin.state is PluginState.BROKEN
    # The host itself is fine.
    good = host.new_admission_plugin(plugin_cmd("admit"))
    assert good.check_admission(pin(3)).result(timeout=30) is None
    host.close()
    assert_no_leaks(before)


def test_plugin_not_executable(make_host: HostFactory, tmp_path: Path) -> None:
    before = resource_baseline()
    script = tmp_path / "plugin.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    host = make_host()
    plugin = host.new_admission_plugin([str(script)])
    error = plugin.check_admission(pin(1)).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert str(script) in error.message
    assert "Permission denied" in error.message
    host.close()
    assert_no_leaks(before)


# -- Crashes -------------------------------------------------------------------


def test_crash_at_start(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("crash-on-start"))
    checks = [plugin.check_admission(pin(n)) for n in range(5)]
    for check in checks:
        error = check.exception(timeout=30)
        assert isinstance(error, PluginStartError)
        assert "exited with code 3" in error.message
        assert "before connecting" in error.message
        # The plugin's own words reach the caller.
        assert "crashing on start as asked" in error.message
    host.close()
    assert_no_leaks(before)


def test_crash_while_connecting(make_host: HostFactory) -> None:
    """Read the handshake, then died before ListAdmissions."""
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(hostile_cmd("crash-after-handshake"))
    error = plugin.check_admission(pin(1)).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert "exited with code 5" in error.message
    assert "before connecting" in error.message
    assert isinstance(plugin.check_admission(pin(2)).exception(timeout=1), PluginStartError)
    host.close()
    assert_no_leaks(before)


def test_crash_midway(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("crash-on-second"))
    assert plugin.check_admission(pin(1)).result(timeout=30) is None
    error = plugin.check_admission(pin(2)).exception(timeout=30)
    assert isinstance(error, PluginAbortedError)
    assert "exited with code 7" in error.message
    # The plugin is broken for good; its answered check stays answered.
    assert plugin.state is PluginState.BROKEN
    assert plugin.check_admission(pin(3)).exception(timeout=1) is error
    assert plugin.check_admission(pin(1)).result(timeout=1) is None
    host.close()
    assert_no_leaks(before)


def test_crash_while_host_closes(make_host: HostFactory) -> None:
    """The plugin exits 9 the moment its stdin closes, checks still pending."""
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(hostile_cmd("crash-on-close"))
    checks = [plugin.check_admission(pin(n)) for n in range(3)]
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 30)
    assert timed(host.close) < 5.0 + CLOSE_MARGIN
    for check in checks:
        assert isinstance(check.exception(timeout=0), PluginAbortedError)
    assert_no_leaks(before)


def test_checks_from_many_threads_while_plugin_crashes(make_host: HostFactory) -> None:
    """Producers blocked on a full queue are released too; no Future hangs."""
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("crash-on-second"), max_pending=8)
    threads_count, per_thread = 8, 100
    checks: list[futures.Future[None]] = []
    lock = threading.Lock()

    def submit(offset: int) -> None:
        for n in range(per_thread):
            check = plugin.check_admission(pin(offset * per_thread + n))
            with lock:
                checks.append(check)

    producers = [threading.Thread(target=submit, args=(i,)) for i in range(threads_count)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join(30)
    assert not any(producer.is_alive() for producer in producers)
    assert len(checks) == threads_count * per_thread
    done, not_done = futures.wait(checks, timeout=30)
    assert not not_done
    errors = [check.exception() for check in done]
    # The first check may or may not have been answered before the crash.
    assert sum(error is None for error in errors) <= 1
    assert all(error is None or isinstance(error, PluginAbortedError) for error in errors)
    host.close()
    assert_no_leaks(before)


# -- Never connects, hangs -------------------------------------------------------


def test_never_connects(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("never-connect"), connect_timeout=1.0)
    error = plugin.check_admission(pin(1)).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert "did not connect within 1 s" in error.message
    # The plugin ignores its closed stdin; the host terminates it anyway.
    assert wait_until(lambda: not plugin_pids("never-connect"), 10)
    host.close()
    assert_no_leaks(before)


def test_close_while_waiting_for_connection(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("never-connect"), connect_timeout=60.0)
    check = plugin.check_admission(pin(1))
    assert wait_until(lambda: bool(plugin_pids("never-connect")), 30)
    assert timed(host.close) < 5.0 + CLOSE_MARGIN
    assert isinstance(check.exception(timeout=0), PluginAbortedError)
    assert_no_leaks(before)


def test_stuck_handler(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("stuck-handler"))
    checks = [plugin.check_admission(pin(n)) for n in range(3)]
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 30)
    assert not any(check.done() for check in checks)
    # The SDK plugin exits on EOF even with handler threads stuck, well
    # before the SIGTERM that would otherwise follow the grace period.
    assert timed(plugin.close) < 5.0 + CLOSE_MARGIN
    for check in checks:
        error = check.exception(timeout=0)
        assert isinstance(error, PluginAbortedError)
        assert "closed" in error.message
    assert isinstance(plugin.check_admission(pin(9)).exception(timeout=0), PluginAbortedError)
    host.close()
    assert_no_leaks(before)


def test_ignores_stdin_eof_ends_by_sigterm(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    recorder = ExitRecorder()
    process = host.launch_plugin(plugin_cmd("ignore-eof"), recorder)
    assert process.returncode is None
    assert timed(host.close) < 5.0 + CLOSE_MARGIN
    assert recorder.exited.wait(5)
    assert process.returncode == -signal.SIGTERM
    assert recorder.process is process
    assert_no_leaks(before)


def test_ignores_sigterm_killed_at_deadline(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    recorder = ExitRecorder()
    process = host.launch_plugin(plugin_cmd("ignore-sigterm"), recorder)
    # Let it get past installing its SIGTERM handler.
    assert wait_until(lambda: _ignores_sigterm(process.pid), 30)
    assert timed(lambda: host.close(timeout=1.5)) < 1.5 + CLOSE_MARGIN
    assert process.returncode == -signal.SIGKILL
    assert_no_leaks(before)


def _ignores_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        pass
    return False


def test_descendants_that_ignore_sigterm_are_killed(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("ignore-sigterm", "2"))
    assert plugin.check_admission(pin(1)).result(timeout=30) is None
    (plugin_pid,) = plugin_pids("ignore-sigterm")

    def family() -> set[int]:
        try:
            return {p.pid for p in psutil.Process(plugin_pid).children(recursive=True)}
        except psutil.Error:
            return set()

    # Two children, each with one grandchild.
    assert wait_until(lambda: len(family()) == 4, 30), family()
    seen = {plugin_pid, *family()}
    assert timed(lambda: host.close(timeout=1.5)) < 1.5 + CLOSE_MARGIN
    assert_all_gone(seen)
    assert_no_leaks(before)


def read_pid(path: Path) -> int:
    """The pid a test plugin wrote to ``path``, once it has."""
    assert wait_until(path.exists, 30), f"no {path.name} was written"
    return int(path.read_text())


@pytest.mark.parametrize("mode", ["orphan", "daemon"])
def test_reparented_descendants_are_killed(make_host: HostFactory, tmp_path: Path, mode: str) -> None:
    """A grandchild whose parent exited, and a setsid double-fork daemon, end with close()."""
    before = resource_baseline()
    host = make_host()
    pid_file = tmp_path / f"{mode}.pid"
    plugin = host.new_admission_plugin(plugin_cmd(mode, str(pid_file)))
    assert plugin.check_admission(pin(1)).result(timeout=30) is None
    left_behind = read_pid(pid_file)
    host.close()
    assert_all_gone({left_behind})
    assert_no_leaks(before)


def test_daemon_of_a_plugin_that_died_is_killed(tmp_path: Path) -> None:
    """The monitor records descendants while the plugin runs: a daemon seen then
    is terminated with the plugin even though the plugin died first."""
    before = resource_baseline()
    pid_file = tmp_path / "daemon.pid"
    # Without a handshake the plugin waits on its stdin, its daemon started.
    process = PluginProcess(plugin_cmd("daemon", str(pid_file)), logger=logging.getLogger("cipdplugin"))
    try:
        daemon = read_pid(pid_file)
        assert wait_until(lambda: daemon in process._family, 30)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
        # Now nothing ties the daemon to the plugin but the record.
        assert psutil.Process(daemon).ppid() != process.pid
    finally:
        process.terminate()
    assert_all_gone({daemon})
    assert_no_leaks(before)


def test_session_member_of_a_plugin_that_died_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A descendant in a process group of its own, orphaned when the plugin died
    before any record of it, is still in the plugin's session."""
    before = resource_baseline()
    # No record after the first, taken as the plugin starts: only the session can tell.
    monkeypatch.setattr(process_module, "FAMILY_INTERVAL", 3600.0)
    pid_file = tmp_path / "member.pid"
    process = PluginProcess(plugin_cmd("new-group", str(pid_file)), logger=logging.getLogger("cipdplugin"))
    try:
        member = read_pid(pid_file)
        assert os.getpgid(member) != process.pid
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
        assert member not in process._family
    finally:
        process.terminate()
    assert_all_gone({member})
    assert_no_leaks(before)


# -- Floods ------------------------------------------------------------------------


class RecordCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in message for message in list(self.messages))


def test_flood_of_output_and_logs(make_host: HostFactory) -> None:
    before = resource_baseline()
    logger = logging.getLogger("cipdplugin.test-flood")
    logger.propagate = False  # Thousands of records are not for the test report.
    logger.setLevel(logging.DEBUG)
    counter = RecordCounter()
    logger.addHandler(counter)
    try:
        host = make_host(logger=logger)
        plugin = host.new_admission_plugin(plugin_cmd("flood", "5000"))
        # Each handler logs 5000 records while the stderr lines pour in.
        checks = [plugin.check_admission(pin(n)) for n in range(3)]
        assert all(check.result(timeout=30) is None for check in checks)
        assert plugin.check_admission(pin(4)).result(timeout=30) is None
        assert wait_until(lambda: counter.count("flood record") > 0, 10)
        assert timed(host.close) < 5.0 + CLOSE_MARGIN
        # Every stderr line reached the log, each on its own, under the plugin's name.
        assert counter.count("stderr: flood line") == 5000
        assert_no_leaks(before)
    finally:
        logger.removeHandler(counter)


def test_output_flood_after_the_plugin_exits(make_host: HostFactory, tmp_path: Path) -> None:
    """A descendant keeps writing to the inherited stdout after the plugin exits."""
    before = resource_baseline()
    logger = logging.getLogger("cipdplugin.test-flood-after-exit")
    logger.propagate = False  # An endless stream of lines is not for the test report.
    logger.setLevel(logging.DEBUG)
    counter = RecordCounter()
    logger.addHandler(counter)
    try:
        host = make_host(logger=logger)
        pid_file = tmp_path / "flooder.pid"
        plugin = host.new_admission_plugin(plugin_cmd("flood-after-exit", str(pid_file)))
        assert plugin.check_admission(pin(1)).result(timeout=30) is None
        flooder = read_pid(pid_file)
        # The plugin exits on its second check; the monitor stops reading and reports it.
        error = plugin.check_admission(pin(2)).exception(timeout=30)
        assert isinstance(error, PluginAbortedError)
        assert "exited with code 7" in error.message
        # Said at most once (the flooder may not have written just as the plugin left).
        assert counter.count("keeps writing to its output") <= 1
        assert psutil.Process(flooder).is_running()
        # The plugin is gone: close() need not wait for it, only end the flooder.
        assert timed(host.close) < CLOSE_MARGIN
        assert_all_gone({flooder})
        assert_no_leaks(before)
    finally:
        logger.removeHandler(counter)


# -- The host dies -------------------------------------------------------------------

HOST_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import psutil
    from cipdplugin import Config, Host, StaticRepository

    host = Host(Config(sys.argv[1], StaticRepository()))
    plugin = host.new_admission_plugin(json.loads(sys.argv[2]))
    plugin.check_admission(sys.argv[3]).result(timeout=60)
    family = psutil.Process().children(recursive=True)
    print(json.dumps([p.pid for p in family]), flush=True)
    time.sleep(600)
    """
)


def test_host_killed_plugin_exits_on_its_own() -> None:
    before = resource_baseline()
    script = subprocess.Popen(
        [sys.executable, "-c", HOST_SCRIPT, SERVICE_URL, json.dumps(plugin_cmd("admit")), pin(1)],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert script.stdout is not None
        ready, _, _ = select.select([script.stdout], [], [], 60)
        assert ready, "the host script did not report its plugin"
        plugin_family = set(json.loads(script.stdout.readline()))
        assert plugin_family
    finally:
        script.kill()
        script.wait(10)
        if script.stdout is not None:
            script.stdout.close()
    # Orphaned, with its stdin at EOF: the plugin leaves within a second or two.
    assert_all_gone(plugin_family, timeout=3.0)
    assert_no_leaks(before)


# -- Closing in awkward moments ---------------------------------------------------------


def test_close_twice(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    assert plugin.check_admission(pin(1)).result(timeout=30) is None
    host.close()
    assert timed(host.close) < 1.0
    plugin.close()
    assert isinstance(plugin.check_admission(pin(2)).exception(timeout=0), PluginAbortedError)
    with pytest.raises(RuntimeError):
        host.new_admission_plugin(plugin_cmd("admit"))
    assert_no_leaks(before)


def test_close_from_two_threads_at_once(make_host: HostFactory) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("stuck-handler"))
    check = plugin.check_admission(pin(1))
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 30)
    closers = [threading.Thread(target=host.close) for _ in range(2)]
    start = time.monotonic()
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(5.0 + 2 * CLOSE_MARGIN)
    assert not any(closer.is_alive() for closer in closers)
    assert time.monotonic() - start < 5.0 + CLOSE_MARGIN
    assert isinstance(check.exception(timeout=0), PluginAbortedError)
    assert_no_leaks(before)


@pytest.mark.parametrize("closer", ["host", "plugin"])
def test_close_while_launching(make_host: HostFactory, closer: str) -> None:
    before = resource_baseline()
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    checks = [plugin.check_admission(pin(n)) for n in range(3)]
    # At once: the launcher thread is still starting the process.
    close = host.close if closer == "host" else plugin.close
    assert timed(close) < 5.0 + CLOSE_MARGIN
    for check in checks:
        error = check.exception(timeout=0)
        assert isinstance(error, AdmissionError)
        assert isinstance(error, PluginAbortedError), error
    host.close()
    assert_no_leaks(before)
