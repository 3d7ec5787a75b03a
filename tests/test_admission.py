"""The admission layer: promises, the cache, the bounded queue, and every way
an admission plugin can fail, end to end with the SDK's test plugin.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from concurrent.futures import Future, wait
from pathlib import Path

import grpc
import pytest

from cipdplugin import (
    AdmissionDenied,
    AdmissionError,
    Config,
    InstanceMetadata,
    ListMetadataRequest,
    ListMetadataResponse,
    Pin,
    PluginAbortedError,
    PluginStartError,
    StaticRepository,
)
from cipdplugin.constants import SDK_PAGE_SIZE
from cipdplugin.host import PluginState
from tests.conftest import (
    CLOSE_MARGIN,
    SERVICE_URL,
    FailingRepository,
    HostFactory,
    ResourceSnapshot,
    assert_no_leaks,
    hex_id,
    hostile_cmd,
    pin,
    plugin_cmd,
    plugin_pids,
    run_host_program,
    timed,
    wait_until,
)

PIN = Pin("a/b", hex_id(1))


def test_admit_and_deny(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    admitted = plugin.check_admission(PIN)
    denied = plugin.check_admission(Pin("deny/me", hex_id(2)))
    failed = plugin.check_admission(Pin("error/me", hex_id(3)))
    assert admitted.result(timeout=30) is None
    error = denied.exception(timeout=30)
    assert isinstance(error, AdmissionDenied)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.message == "deny/me is denied"
    error = failed.exception(timeout=30)
    assert type(error) is AdmissionError
    assert error.code is grpc.StatusCode.PERMISSION_DENIED
    assert error.message == "no access"


def test_same_pin_shares_one_future_until_clear_cache(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("slow", "0.3"))
    first = plugin.check_admission(PIN)
    assert plugin.check_admission(PIN) is first  # while pending
    assert plugin.check_admission(str(PIN)) is first  # the string form is the same pin
    plugin.clear_cache()
    assert plugin.check_admission(PIN) is first  # pending promises survive clear_cache
    assert first.result(timeout=30) is None
    assert plugin.check_admission(PIN) is first  # after it resolved
    plugin.clear_cache()
    second = plugin.check_admission(PIN)
    assert second is not first
    assert second.result(timeout=30) is None


def test_futures_cannot_be_cancelled(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("slow", "0.3"))
    future = plugin.check_admission(PIN)
    assert future.cancel() is False
    assert not future.cancelled()
    assert future.result(timeout=30) is None


def test_a_thousand_checks_in_a_burst(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"), max_pending=64)
    pins = [Pin("deny/x" if n % 10 == 0 else "ok/x", hex_id(n)) for n in range(1000)]
    futures = [plugin.check_admission(pin) for pin in pins]
    _, pending = wait(futures, timeout=60)
    assert not pending
    for checked, future in zip(pins, futures, strict=True):
        if checked.package == "deny/x":
            assert isinstance(future.exception(), AdmissionDenied)
        else:
            assert future.exception() is None


def test_checks_after_close_fail_at_once(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    assert plugin.check_admission(PIN).result(timeout=30) is None
    plugin.close()
    assert plugin.state is PluginState.CLOSED
    later = plugin.check_admission(Pin("a/b", hex_id(2)))
    assert later.done()
    assert isinstance(later.exception(), PluginAbortedError)
    assert plugin.check_admission(PIN).result(timeout=0) is None  # resolved promises stay cached
    plugin.close()  # idempotent


def test_invalid_pin_strings_are_rejected(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    for bad in ("a/b", "A/b:" + hex_id(1), "a/b:xyz", "a/b:c:d"):
        with pytest.raises(ValueError):
            plugin.check_admission(bad)
    assert plugin.state is PluginState.NOT_STARTED  # nothing was started for bad input


def test_admission_request_carries_the_pin_and_service_url(make_host: HostFactory) -> None:
    sha256_pin = Pin("a/b", "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4kC")
    plugin = make_host().new_admission_plugin(plugin_cmd("echo-request"))
    error = plugin.check_admission(sha256_pin).exception(timeout=30)
    assert isinstance(error, AdmissionDenied)
    assert error.message == f"{SERVICE_URL} {sha256_pin} 2 {sha256_pin.object_ref.hex_digest}"


def test_a_pin_over_the_message_limit_is_refused_alone(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    before = plugin.check_admission(PIN)
    huge = plugin.check_admission(Pin("a" * (5 * 1024 * 1024), hex_id(2)))
    error = huge.exception(timeout=0)  # refused before anything is sent
    assert type(error) is AdmissionError
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "message limit" in error.message
    assert before.result(timeout=30) is None
    assert plugin.check_admission(Pin("a/c", hex_id(3))).result(timeout=30) is None
    assert plugin.state is PluginState.CONNECTED


class RecordingRepository:
    """A StaticRepository that remembers every request it answered."""

    def __init__(self, inner: StaticRepository) -> None:
        self.inner = inner
        self.requests: list[ListMetadataRequest] = []
        self._lock = threading.Lock()

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        with self._lock:
            copy = ListMetadataRequest()
            copy.CopyFrom(request)
            self.requests.append(copy)
        return self.inner.list_metadata(request)


def repository_with(pin: Pin, count: int, key: str = "note") -> RecordingRepository:
    entries = [InstanceMetadata(key=key, value=f"value {n}".encode()) for n in range(count)]
    for n, entry in enumerate(entries):
        entry.attached_ts.FromSeconds(1_700_000_000 + n)
    return RecordingRepository(StaticRepository({pin: entries}))


def test_metadata_visits_all_pages(make_host: HostFactory) -> None:
    repo = repository_with(PIN, 15)
    plugin = make_host(Config(SERVICE_URL, repo)).new_admission_plugin(plugin_cmd("metadata-all", "7"))
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert isinstance(error, AdmissionDenied)
    assert error.message == "visited 15 entries"
    assert len(repo.requests) == 3
    assert [r.page_size for r in repo.requests] == [7, 7, 7]
    assert repo.requests[0].page_token == ""
    assert repo.requests[1].page_token != ""
    assert repo.requests[2].page_token not in ("", repo.requests[1].page_token)
    assert all(r.package == PIN.package and r.instance == PIN.object_ref for r in repo.requests)


def test_metadata_visiting_only_the_first_entry_fetches_one_page(make_host: HostFactory) -> None:
    repo = repository_with(PIN, 45, key="allow")
    plugin = make_host(Config(SERVICE_URL, repo)).new_admission_plugin(plugin_cmd("metadata-first"))
    assert plugin.check_admission(PIN).result(timeout=30) is None
    assert len(repo.requests) == 1
    assert repo.requests[0].page_size == SDK_PAGE_SIZE == 20


class LoopingRepository:
    """Pages that lead back to an earlier page: ``tokens`` in turn, forever."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = tokens
        self.calls = 0

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        self.calls += 1
        entry = InstanceMetadata(key="note", value=b"again")
        token = self.tokens[(self.calls - 1) % len(self.tokens)]
        return ListMetadataResponse(metadata=[entry], next_page_token=token)


@pytest.mark.parametrize(
    ("tokens", "calls"), [(("same",), 2), (("first", "second"), 3), (("a", "b", "c", "b"), 4)]
)
def test_metadata_pages_that_loop_fail_the_check(
    make_host: HostFactory, tokens: tuple[str, ...], calls: int
) -> None:
    repo = LoopingRepository(*tokens)
    plugin = make_host(Config(SERVICE_URL, repo)).new_admission_plugin(plugin_cmd("metadata-all", "1"))
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert type(error) is AdmissionError
    assert error.code is grpc.StatusCode.INTERNAL
    assert "metadata pages loop" in error.message
    assert repo.calls == calls


def test_repository_error_reaches_the_caller(make_host: HostFactory) -> None:
    repository = FailingRepository(AdmissionError("the backend is down", code=grpc.StatusCode.UNAVAILABLE))
    plugin = make_host(Config(SERVICE_URL, repository)).new_admission_plugin(plugin_cmd("metadata"))
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert type(error) is AdmissionError
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.message == "the backend is down"


@pytest.mark.parametrize("exception", [KeyboardInterrupt, SystemExit])
def test_repository_raising_an_interpreter_exit_answers_internal(
    make_host: HostFactory, exception: type[BaseException]
) -> None:
    host = make_host(Config(SERVICE_URL, FailingRepository(exception())))
    plugin = host.new_admission_plugin(plugin_cmd("metadata"))
    # Unanswered, the plugin would wait out its own 30 s deadline.
    error = plugin.check_admission(PIN).exception(timeout=20)
    assert isinstance(error, AdmissionError)
    assert error.code is grpc.StatusCode.INTERNAL
    assert exception.__name__ in error.message
    assert plugin.state is PluginState.CONNECTED


def test_handler_raising_unexpectedly_is_aborted_and_plugin_keeps_serving(
    make_host: HostFactory,
) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("raise"))
    for n in range(3):
        error = plugin.check_admission(Pin("a/b", hex_id(n))).exception(timeout=30)
        assert type(error) is AdmissionError
        assert error.code is grpc.StatusCode.ABORTED
        assert "ValueError: boom" in error.message
    assert plugin.state is PluginState.CONNECTED


def test_plugin_not_found(baseline: ResourceSnapshot, make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host()
    missing = str(tmp_path / "no-such-plugin")
    plugin = host.new_admission_plugin([missing, "--flag"])
    error = plugin.check_admission(pin(1)).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert missing in error.message
    assert "No such file" in error.message
    # Broken for good: later checks fail at once, saying so and what to do.
    later = plugin.check_admission(pin(2)).exception(timeout=1)
    assert isinstance(later, PluginStartError) and later.code is error.code
    assert later.message.startswith(error.message)
    assert "new_admission_plugin" in later.message
    assert plugin.state is PluginState.BROKEN
    # The host itself is fine.
    good = host.new_admission_plugin(plugin_cmd("admit"))
    assert good.check_admission(pin(3)).result(timeout=30) is None
    host.close()
    assert_no_leaks(baseline)


@pytest.mark.parametrize(
    ("cmdline", "code", "last_words"),
    [
        (plugin_cmd("crash-on-start"), 3, "crashing on start as asked"),
        (plugin_cmd("crash-on-connect"), 4, "crashing while connecting as asked"),
        (hostile_cmd("crash-after-handshake"), 5, None),
    ],
    ids=["at-start", "after-handshake-sdk", "after-handshake-raw"],
)
def test_crash_before_connecting(
    baseline: ResourceSnapshot, make_host: HostFactory, cmdline: list[str], code: int, last_words: str | None
) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(cmdline)
    checks = [plugin.check_admission(pin(n)) for n in range(3)]
    for check in checks:
        error = check.exception(timeout=30)
        assert isinstance(error, PluginStartError)
        assert f"exited with code {code}" in error.message
        assert "before connecting" in error.message
        # The plugin's own words reach the caller.
        assert last_words is None or last_words in error.message
    assert isinstance(plugin.check_admission(pin(9)).exception(timeout=0), PluginStartError)
    host.close()
    assert_no_leaks(baseline)


def test_crash_midway(baseline: ResourceSnapshot, make_host: HostFactory) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("crash-on-second"))
    assert plugin.check_admission(pin(1)).result(timeout=30) is None
    error = plugin.check_admission(pin(2)).exception(timeout=30)
    assert isinstance(error, PluginAbortedError)
    assert "exited with code 7" in error.message
    # The plugin is broken for good; its answered check stays answered.
    assert plugin.state is PluginState.BROKEN
    later = plugin.check_admission(pin(3)).exception(timeout=1)
    assert isinstance(later, PluginAbortedError) and later.message.startswith(error.message)
    assert plugin.check_admission(pin(1)).result(timeout=1) is None
    host.close()
    assert_no_leaks(baseline)


def test_crash_while_host_closes(baseline: ResourceSnapshot, make_host: HostFactory) -> None:
    """The plugin exits 9 the moment its stdin closes, checks still pending."""
    host = make_host()
    plugin = host.new_admission_plugin(hostile_cmd("crash-on-close"))
    checks = [plugin.check_admission(pin(n)) for n in range(3)]
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 30)
    host.close()
    for check in checks:
        assert isinstance(check.exception(timeout=0), PluginAbortedError)
    assert_no_leaks(baseline)


def test_checks_from_many_threads_while_plugin_crashes(
    baseline: ResourceSnapshot, make_host: HostFactory
) -> None:
    """Producers blocked on a full queue are released too; no Future hangs."""
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
    assert_no_leaks(baseline)


def test_never_connects(baseline: ResourceSnapshot, make_host: HostFactory) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("never-connect"), connect_timeout=1.0)
    error = plugin.check_admission(pin(1)).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert "did not connect within 1 s" in error.message
    # The plugin ignores its closed stdin; the host terminates it anyway.
    assert wait_until(lambda: not plugin_pids("never-connect"), 10)
    host.close()
    assert_no_leaks(baseline)


def test_close_while_waiting_for_connection(baseline: ResourceSnapshot, make_host: HostFactory) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("never-connect"), connect_timeout=60.0)
    check = plugin.check_admission(pin(1))
    assert wait_until(lambda: bool(plugin_pids("never-connect")), 30)
    host.close()
    assert isinstance(check.exception(timeout=0), PluginAbortedError)
    assert_no_leaks(baseline)


def test_stuck_handler(baseline: ResourceSnapshot, make_host: HostFactory) -> None:
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
    assert_no_leaks(baseline)


def test_closing_with_a_queue_of_pending_checks(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("slow", "5"), max_pending=8)
    futures = [plugin.check_admission(Pin("a/b", hex_id(n))) for n in range(8)]
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 20)
    plugin.close()
    for future in futures:
        assert isinstance(future.exception(timeout=0), PluginAbortedError)


def test_bounded_queue_blocks_until_the_plugin_closes(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("never-connect"), max_pending=3)
    for n in range(3):
        plugin.check_admission(Pin("a/b", hex_id(n)))
    blocked: list[Future[None]] = []
    caller = threading.Thread(target=lambda: blocked.append(plugin.check_admission(Pin("a/b", hex_id(99)))))
    caller.start()
    caller.join(0.5)
    assert caller.is_alive(), "the fourth check should wait for room"
    plugin.close(timeout=1.0)
    caller.join(5)
    assert not caller.is_alive()
    assert blocked[0].done() and isinstance(blocked[0].exception(), PluginAbortedError)


def test_bounded_queue_unblocks_when_the_plugin_drains_it(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("slow-connect", "1.0"), max_pending=3)
    for n in range(3):
        plugin.check_admission(Pin("a/b", hex_id(n)))
    blocked: list[Future[None]] = []
    caller = threading.Thread(target=lambda: blocked.append(plugin.check_admission(Pin("a/b", hex_id(99)))))
    caller.start()
    caller.join(0.3)
    assert caller.is_alive(), "the fourth check should wait for room"
    caller.join(30)
    assert not caller.is_alive()
    assert blocked[0].result(timeout=30) is None


def test_check_admission_times_out_when_the_queue_has_no_room(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("never-connect"), max_pending=1)
    first = plugin.check_admission(PIN)
    with pytest.raises(TimeoutError, match="no room"):
        plugin.check_admission(Pin("a/b", hex_id(2)), timeout=0.2)
    with pytest.raises(ValueError, match="timeout"):
        plugin.check_admission(Pin("a/b", hex_id(3)), timeout=float("nan"))
    assert not first.done()
    plugin.close()
    assert isinstance(first.exception(timeout=0), PluginAbortedError)


@pytest.mark.parametrize(
    ("keywords", "error", "text"),
    [
        ({"connect_timeout": float("inf")}, ValueError, "connect_timeout"),
        ({"connect_timeout": float("nan")}, ValueError, "connect_timeout"),
        ({"connect_timeout": 1e300 * 1e300}, ValueError, "connect_timeout"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout"),
        ({"connect_timeout": -1.0}, ValueError, "connect_timeout"),
        ({"connect_timeout": "30"}, TypeError, "connect_timeout"),
        ({"connect_timeout": True}, TypeError, "connect_timeout"),
        ({"max_pending": 1.5}, TypeError, "max_pending"),
        ({"max_pending": float("inf")}, TypeError, "max_pending"),
        ({"max_pending": True}, TypeError, "max_pending"),
        ({"max_pending": "8"}, TypeError, "max_pending"),
        ({"max_pending": 0}, ValueError, "max_pending"),
    ],
)
def test_new_admission_plugin_validates_its_limits(
    make_host: HostFactory, keywords: dict[str, object], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        make_host().new_admission_plugin(plugin_cmd("admit"), **keywords)  # type: ignore[arg-type]


def test_a_huge_connect_timeout_still_starts_the_plugin(make_host: HostFactory) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"), connect_timeout=1e300)
    assert plugin.check_admission(PIN).result(timeout=30) is None


def test_32_plugins_on_one_host_with_checks_in_flight(make_host: HostFactory) -> None:
    host = make_host()
    plugins = [host.new_admission_plugin(plugin_cmd("slow", "0.5")) for _ in range(32)]
    futures = [p.check_admission(Pin("a/b", hex_id(n))) for p in plugins for n in range(4)]
    # While every plugin holds its stream, short RPCs (resolutions) must
    # still get through.
    _, pending = wait(futures, timeout=90)
    assert not pending
    assert all(f.exception() is None for f in futures)
    assert all(p.state is PluginState.CONNECTED for p in plugins)


@pytest.mark.parametrize("closer", ["host", "plugin"])
def test_close_while_launching(baseline: ResourceSnapshot, make_host: HostFactory, closer: str) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    checks = [plugin.check_admission(pin(n)) for n in range(3)]
    # At once: the launcher thread is still starting the process.
    close = host.close if closer == "host" else plugin.close
    close()
    for check in checks:
        error = check.exception(timeout=0)
        assert isinstance(error, AdmissionError)
        assert isinstance(error, PluginAbortedError), error
    host.close()
    assert_no_leaks(baseline)


def test_closing_the_host_from_a_future_callback(make_host: HostFactory) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    closed = threading.Event()

    def close_host(_: Future[None]) -> None:
        host.close()
        closed.set()

    # The callback runs on a thread of the server's pool (the answer is
    # settled on the server's loop, which runs no callbacks).
    plugin.check_admission(PIN).add_done_callback(close_host)
    assert closed.wait(15)
    assert plugin.state is PluginState.CLOSED


def test_callbacks_of_answered_checks_run_off_the_servers_loop(make_host: HostFactory) -> None:
    """A callback that waits for another check's answer does not hold up the
    server: answers are settled on its loop, and their callbacks run on its
    pool, so the loop serves the answer the callback waits for."""
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    assert plugin.check_admission(pin(1)).result(timeout=30) is None
    seen: list[tuple[str, object]] = []
    done = threading.Event()

    def check_another(_: Future[None]) -> None:
        try:
            seen.append((threading.current_thread().name, plugin.check_admission(pin(3)).result(timeout=10)))
        finally:
            done.set()

    plugin.check_admission(pin(2)).add_done_callback(check_another)
    assert done.wait(30)
    [(thread, verdict)] = seen
    assert verdict is None
    assert thread.startswith("cipdplugin-server-") and thread != "cipdplugin-server-loop", thread


def test_closing_the_host_from_a_callback_that_close_runs(make_host: HostFactory) -> None:
    """A callback of a check that close() fails closes the host again: the
    nested call returns at once, and the outer one is not held up by it."""
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("stuck-handler"))
    pending = plugin.check_admission(PIN)
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 30)
    nested: list[float] = []

    def close_again(_: Future[None]) -> None:
        started = time.monotonic()
        host.close()
        nested.append(time.monotonic() - started)

    pending.add_done_callback(close_again)
    started = time.monotonic()
    host.close()
    # The bound is the point: the old nested wait took the full 5 s deadline plus 1 s.
    assert time.monotonic() - started < 3.0
    assert isinstance(pending.exception(timeout=0), PluginAbortedError)
    assert len(nested) == 1 and nested[0] < 1.0


@pytest.mark.parametrize("mode", ["close-in-signal-handler", "interrupt-checks"])
def test_no_future_is_left_pending_by_signals(mode: str) -> None:
    """Host.close() from a signal handler that interrupted check_admission() or
    clear_cache() ends within its limit; KeyboardInterrupts landing anywhere in
    check_admission() leave no Future pending after close()."""
    report = run_host_program(mode)
    for result in report.get("rounds", [report]):
        assert result["pending after close"] == 0
        if "close seconds" in result:
            assert result["close seconds"] is not None and result["close seconds"] < 2 + 2
