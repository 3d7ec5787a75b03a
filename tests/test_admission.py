"""Admission plugins end to end: promises, the bounded queue, the SDK, failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait

import grpc
import pytest

from cipdplugin import (
    AdmissionDenied,
    AdmissionError,
    Config,
    Host,
    InstanceMetadata,
    ListMetadataRequest,
    ListMetadataResponse,
    Pin,
    PluginAbortedError,
    PluginStartError,
    StaticRepository,
)
from cipdplugin.host import PluginState
from tests.conftest import SERVICE_URL, hex_id, plugin_cmd, wait_until

PIN = Pin("a/b", hex_id(1))


def test_admit_and_deny(make_host: Callable[..., Host]) -> None:
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


def test_same_pin_shares_one_future_until_clear_cache(make_host: Callable[..., Host]) -> None:
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


def test_futures_cannot_be_cancelled(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("slow", "0.3"))
    future = plugin.check_admission(PIN)
    assert future.cancel() is False
    assert not future.cancelled()
    assert future.result(timeout=30) is None


def test_a_thousand_checks_in_a_burst(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"), max_pending=64)
    pins = [Pin("deny/x" if n % 10 == 0 else "ok/x", hex_id(n)) for n in range(1000)]
    futures = [plugin.check_admission(pin) for pin in pins]
    _, pending = wait(futures, timeout=60)
    assert not pending
    for pin, future in zip(pins, futures, strict=True):
        if pin.package == "deny/x":
            assert isinstance(future.exception(), AdmissionDenied)
        else:
            assert future.exception() is None


def test_checks_after_close_fail_at_once(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    assert plugin.check_admission(PIN).result(timeout=30) is None
    plugin.close()
    assert plugin.state is PluginState.CLOSED
    later = plugin.check_admission(Pin("a/b", hex_id(2)))
    assert later.done()
    assert isinstance(later.exception(), PluginAbortedError)
    assert plugin.check_admission(PIN).result(timeout=0) is None  # resolved promises stay cached
    plugin.close()  # idempotent


def test_invalid_pin_strings_are_rejected(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    for bad in ("a/b", "A/b:" + hex_id(1), "a/b:xyz", "a/b:c:d"):
        with pytest.raises(ValueError):
            plugin.check_admission(bad)
    assert plugin.state is PluginState.NOT_STARTED  # nothing was started for bad input


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


def test_metadata_visits_all_pages(make_host: Callable[..., Host]) -> None:
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


def test_metadata_visiting_only_the_first_entry_fetches_one_page(make_host: Callable[..., Host]) -> None:
    repo = repository_with(PIN, 45, key="allow")
    plugin = make_host(Config(SERVICE_URL, repo)).new_admission_plugin(plugin_cmd("metadata-first"))
    assert plugin.check_admission(PIN).result(timeout=30) is None
    assert len(repo.requests) == 1
    assert repo.requests[0].page_size == 20


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
    make_host: Callable[..., Host], tokens: tuple[str, ...], calls: int
) -> None:
    repo = LoopingRepository(*tokens)
    plugin = make_host(Config(SERVICE_URL, repo)).new_admission_plugin(plugin_cmd("metadata-all", "1"))
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert type(error) is AdmissionError
    assert error.code is grpc.StatusCode.INTERNAL
    assert "metadata pages loop" in error.message
    assert repo.calls == calls


class BrokenRepository:
    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        raise AdmissionError(grpc.StatusCode.UNAVAILABLE, "the backend is down")


def test_repository_error_reaches_the_caller(make_host: Callable[..., Host]) -> None:
    plugin = make_host(Config(SERVICE_URL, BrokenRepository())).new_admission_plugin(plugin_cmd("metadata"))
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert type(error) is AdmissionError
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.message == "the backend is down"


def test_handler_raising_unexpectedly_is_aborted_and_plugin_keeps_serving(
    make_host: Callable[..., Host],
) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("raise"))
    for n in range(3):
        error = plugin.check_admission(Pin("a/b", hex_id(n))).exception(timeout=30)
        assert type(error) is AdmissionError
        assert error.code is grpc.StatusCode.ABORTED
        assert "ValueError: boom" in error.message
    assert plugin.state is PluginState.CONNECTED


def test_closing_right_after_starting(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    future = plugin.check_admission(PIN)
    started = time.monotonic()
    plugin.close()
    assert time.monotonic() - started < 6.0
    assert future.done()
    error = future.exception()
    assert error is None or isinstance(error, PluginAbortedError)


def test_plugin_that_never_connects_times_out(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("never-connect"), connect_timeout=1.0)
    started = time.monotonic()
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not connect within 1 s" in error.message
    assert time.monotonic() - started < 10
    assert wait_until(lambda: plugin._process is not None and plugin._process.done.is_set(), 10)


def test_close_while_waiting_for_the_connection(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("never-connect"))
    future = plugin.check_admission(PIN)
    time.sleep(0.3)
    started = time.monotonic()
    plugin.close(timeout=2.0)
    assert time.monotonic() - started < 2.0 + 1.5
    assert isinstance(future.exception(timeout=0), PluginAbortedError)


def test_plugin_that_does_not_exist(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(["/nonexistent/admission-plugin"])
    assert plugin.executable == "/nonexistent/admission-plugin"
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert "/nonexistent/admission-plugin" in error.message
    later = plugin.check_admission(Pin("a/b", hex_id(2)))
    assert later.done() and isinstance(later.exception(), PluginStartError)


def test_plugin_speaking_another_protocol_version(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("wrong-version"))
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert "protocol version 2" in error.message
    # Its stdin is closed, so the SDK plugin stops by itself: with 3 if it
    # read the refusal first, 0 if it saw its stdin close first.
    assert wait_until(lambda: plugin._process is not None and plugin._process.done.is_set(), 10)
    assert plugin._process is not None and plugin._process.returncode in (0, 3)


def test_plugin_crashing_while_connecting(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("crash-on-connect"))
    error = plugin.check_admission(PIN).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert "exited with code 4" in error.message
    assert "before connecting" in error.message
    assert "crashing while connecting as asked" in error.message


def test_plugin_crashing_on_its_second_check(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("crash-on-second"))
    assert plugin.check_admission(PIN).result(timeout=30) is None
    error = plugin.check_admission(Pin("a/b", hex_id(2))).exception(timeout=30)
    assert isinstance(error, PluginAbortedError)
    assert "exited with code 7" in error.message
    assert plugin.state is PluginState.BROKEN
    later = plugin.check_admission(Pin("a/b", hex_id(3)))
    assert later.done() and later.exception() is error


def test_closing_with_a_queue_of_pending_checks(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("slow", "5"), max_pending=8)
    futures = [plugin.check_admission(Pin("a/b", hex_id(n))) for n in range(8)]
    assert wait_until(lambda: plugin.state is PluginState.CONNECTED, 20)
    started = time.monotonic()
    plugin.close()
    assert time.monotonic() - started < 6.5
    for future in futures:
        assert isinstance(future.exception(timeout=0), PluginAbortedError)


def test_bounded_queue_blocks_until_the_plugin_closes(make_host: Callable[..., Host]) -> None:
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


def test_bounded_queue_unblocks_when_the_plugin_drains_it(make_host: Callable[..., Host]) -> None:
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


def test_32_plugins_on_one_host_with_checks_in_flight(make_host: Callable[..., Host]) -> None:
    host = make_host()
    plugins = [host.new_admission_plugin(plugin_cmd("slow", "0.5")) for _ in range(32)]
    futures = [p.check_admission(Pin("a/b", hex_id(n))) for p in plugins for n in range(4)]
    # While every plugin holds its stream, short RPCs (resolutions) must
    # still get through.
    _, pending = wait(futures, timeout=90)
    assert not pending
    assert all(f.exception() is None for f in futures)
    assert all(p.state is PluginState.CONNECTED for p in plugins)


def test_admission_request_carries_the_pin_and_service_url(make_host: Callable[..., Host]) -> None:
    sha256_pin = Pin("a/b", "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4kC")
    plugin = make_host().new_admission_plugin(plugin_cmd("echo-request"))
    error = plugin.check_admission(sha256_pin).exception(timeout=30)
    assert isinstance(error, AdmissionDenied)
    assert error.message == f"{SERVICE_URL} {sha256_pin} 2 {sha256_pin.object_ref.hex_digest}"


def test_closing_the_host_from_a_future_callback(make_host: Callable[..., Host]) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    closed = threading.Event()

    def close_host(_: Future[None]) -> None:
        host.close()
        closed.set()

    # The callback runs on the server thread that receives the resolution.
    plugin.check_admission(PIN).add_done_callback(close_host)
    assert closed.wait(15)
    assert plugin.state is PluginState.CLOSED
