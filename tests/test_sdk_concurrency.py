"""The plugin SDK under load: how many handlers run at once, bursts against a
slow repository, answers and log records the host refuses for capacity, and
stopping with handlers stuck; and the thread pool underneath. Every plugin
scenario is a real plugin process, under our host, the Go host, or a small
grpcio host written here that refuses calls on demand."""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from cipdplugin import (
    AdmissionDenied,
    AdmissionError,
    Config,
    Host,
    InstanceMetadata,
    ListMetadataRequest,
    ListMetadataResponse,
    Pin,
)
from cipdplugin.constants import SDK_MAX_WORKERS, SDK_RUNNING_HANDLERS
from cipdplugin.host.checks import admission_id
from cipdplugin.plugins import logs
from cipdplugin.protocol import TICKET_METADATA_KEY, plugin_pb2
from cipdplugin.threads import DaemonThreads
from tests.conftest import REPO_ROOT, SERVICE_URL, hex_id, plugin_cmd, wait_until
from tests.plain_grpc import protocol_handlers, stream_from

GO_BIN = REPO_ROOT.parent / "shared" / "anchors" / "bin"
needs_go = pytest.mark.skipif(
    not (GO_BIN / "go-host-driver").exists(),
    reason="needs the Go binaries of ../shared/anchors/bin (not part of this checkout)",
)


class SlowRepository:
    """A repository that answers after ``delay`` seconds, and counts the calls it serves at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        # Guards the fields below.
        self._lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.calls = 0

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        with self._lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(self.delay)
            return ListMetadataResponse(metadata=[InstanceMetadata(key="allow", value=b"yes")])
        finally:
            with self._lock:
                self.active -= 1


# -- Handlers at once ----------------------------------------------------------


@pytest.mark.parametrize("max_workers", [1, 6, 3 * SDK_RUNNING_HANDLERS])
def test_handlers_run_at_once_up_to_max_workers_and_no_further(max_workers: int) -> None:
    # Each handler waits on the host for its metadata: max_workers of them at
    # once, no fewer (waiting handlers do not count as running) and no more.
    repository = SlowRepository(0.2)
    with Host(Config(SERVICE_URL, repository)) as host:
        plugin = host.new_admission_plugin(plugin_cmd("workers", str(max_workers)))
        checks = [plugin.check_admission(Pin("a/b", hex_id(n))) for n in range(4 * max_workers)]
        assert [check.exception(timeout=60) for check in checks] == [None] * len(checks)
    assert repository.peak == max_workers
    assert repository.calls == len(checks)


def test_a_burst_of_1000_checks_on_a_slow_repository_all_resolve() -> None:
    # More metadata calls at once than our host's server serves: those it
    # refuses for capacity are asked again, and every check still resolves.
    repository = SlowRepository(0.1)
    with Host(Config(SERVICE_URL, repository)) as host:
        plugin = host.new_admission_plugin(plugin_cmd("metadata"))
        checks = [plugin.check_admission(Pin("a/b", hex_id(n))) for n in range(1000)]
        assert [check.exception(timeout=120) for check in checks] == [None] * len(checks)
    assert repository.calls == 1000
    # Far more than the 16 handlers the SDK used to run, within its bound.
    assert 16 < repository.peak <= SDK_MAX_WORKERS


def run_go_host(*flags: str, plugin: list[str]) -> dict[str, Any]:
    """Drive ``plugin`` with the Go CIPD host; its JSON report."""
    done = subprocess.run(
        [str(GO_BIN / "go-host-driver"), *flags, "-json", "--", *plugin],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


@needs_go
def test_the_go_host_sees_max_workers_metadata_calls_at_once() -> None:
    report = run_go_host(
        "-n", "120", "-allow-md", "-md-latency", "200ms", "-expect", "admit",
        plugin=plugin_cmd("allowed-sha256", "12"),
    )  # fmt: skip
    assert (report["admitted"], report["errors"]) == (120, 0)
    assert report["max_concurrent_md"] == 12


@needs_go
def test_a_burst_of_1000_checks_from_the_go_host_on_a_100ms_repository_all_resolve() -> None:
    report = run_go_host(
        "-n", "1000", "-allow-md", "-md-latency", "100ms",
        "-deny-every", "10", "-deny-prefix", "experimental/pkg/", "-expect", "admit",
        plugin=plugin_cmd("allowed-sha256"),
    )  # fmt: skip
    assert (report["admitted"], report["denied"], report["errors"]) == (900, 100, 0)
    assert report["mismatches"] == 0
    assert 16 < report["max_concurrent_md"] <= SDK_MAX_WORKERS


# -- A host that refuses calls -----------------------------------------------------

TICKET = "refusing-host-ticket"


class RefusingHost:
    """A bare grpcio host that refuses the first calls of a kind with the codes it is given.

    ``refuse_resolve`` and ``refuse_log`` are consumed one code per call;
    ``hold_metadata`` makes every ListMetadata wait until it is set.
    """

    def __init__(self, threads: int = 400) -> None:
        self.admissions: queue.Queue[plugin_pb2.Admission | None] = queue.Queue()
        # Guards the fields below.
        self.lock = threading.Lock()
        self.refuse_resolve: list[grpc.StatusCode] = []
        self.refuse_log: list[grpc.StatusCode] = []
        self.resolve_attempts: Counter[str] = Counter()
        self.resolutions: dict[str, plugin_pb2.ResolveAdmissionRequest] = {}
        self.logs: list[str] = []
        self.metadata_calls = 0
        self.hold_metadata = threading.Event()
        # A thread for every ListMetadata a test holds, and some.
        self.executor = futures.ThreadPoolExecutor(threads)
        self.server = grpc.server(self.executor, options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers(
            protocol_handlers(
                list_admissions=self._list,
                resolve_admission=self._resolve,
                log=self._log,
                list_metadata=self._list_metadata,
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @staticmethod
    def _check_ticket(context: grpc.ServicerContext) -> None:
        if dict(context.invocation_metadata()).get(TICKET_METADATA_KEY) != TICKET:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong ticket")

    def _list(
        self, request: plugin_pb2.ListAdmissionsRequest, context: grpc.ServicerContext
    ) -> Iterator[plugin_pb2.Admission]:
        self._check_ticket(context)
        if request.protocol_version != 1:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unsupported protocol version")
        yield from stream_from(self.admissions, context)

    def _resolve(self, request: plugin_pb2.ResolveAdmissionRequest, context: grpc.ServicerContext) -> Empty:
        self._check_ticket(context)
        with self.lock:
            self.resolve_attempts[request.admission_id] += 1
            refusal = self.refuse_resolve.pop(0) if self.refuse_resolve else None
            if refusal is None:
                self.resolutions[request.admission_id] = request
        if refusal is not None:
            context.abort(refusal, "refused for the test")
        return Empty()

    def _log(self, request: plugin_pb2.LogRequest, context: grpc.ServicerContext) -> Empty:
        self._check_ticket(context)
        with self.lock:
            refusal = self.refuse_log.pop(0) if self.refuse_log else None
            if refusal is None:
                self.logs.append(request.message)
        if refusal is not None:
            context.abort(refusal, "refused for the test")
        return Empty()

    def _list_metadata(
        self, request: plugin_pb2.ListMetadataRequest, context: grpc.ServicerContext
    ) -> plugin_pb2.ListMetadataResponse:
        self._check_ticket(context)
        with self.lock:
            self.metadata_calls += 1
        while not self.hold_metadata.wait(0.1) and context.is_active():
            pass
        return plugin_pb2.ListMetadataResponse()

    def ask(self, pin: Pin) -> str:
        """Queue an admission of ``pin``; its ID."""
        admission = plugin_pb2.Admission(
            service_url=SERVICE_URL, package=pin.package, instance=pin.object_ref
        )
        admission.admission_id = admission_id(admission, b"4242")
        self.admissions.put(admission)
        return admission.admission_id

    def resolved(self, ids: list[str], timeout: float = 30) -> bool:
        def done() -> bool:
            with self.lock:
                return all(i in self.resolutions for i in ids)

        return wait_until(done, timeout)

    def stop(self) -> None:
        self.hold_metadata.set()
        self.admissions.put(None)
        self.server.stop(None).wait(5)
        self.executor.shutdown(wait=True)


@pytest.fixture
def refusing_host() -> Iterator[RefusingHost]:
    host = RefusingHost()
    yield host
    host.stop()


@pytest.fixture
def start_plugin(refusing_host: RefusingHost) -> Iterator[Any]:
    """Start a test plugin against ``refusing_host``; it is gone when the test ends."""
    started: list[subprocess.Popen[bytes]] = []

    def start(mode: str, *args: str) -> subprocess.Popen[bytes]:
        plugin = subprocess.Popen(plugin_cmd(mode, *args), stdin=subprocess.PIPE)
        assert plugin.stdin is not None
        plugin.stdin.write(f'{{"port": {refusing_host.port}, "ticket": "{TICKET}"}}\n'.encode())
        plugin.stdin.flush()
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        if plugin.poll() is None:
            plugin.kill()
        plugin.wait(10)
        assert plugin.stdin is not None
        plugin.stdin.close()


REFUSALS = [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED]


@pytest.mark.parametrize("code", REFUSALS, ids=lambda code: code.name)
def test_answers_refused_for_capacity_are_sent_again(
    refusing_host: RefusingHost, start_plugin: Any, code: grpc.StatusCode
) -> None:
    refusing_host.refuse_resolve = [code] * 30
    start_plugin("admit")
    ids = [refusing_host.ask(Pin("deny/b" if n % 2 else "a/b", hex_id(n))) for n in range(20)]
    assert refusing_host.resolved(ids)
    with refusing_host.lock:
        assert sum(refusing_host.resolve_attempts.values()) == 20 + 30
        # Each answer is the handler's, however many times it was sent.
        for n, i in enumerate(ids):
            resolution = refusing_host.resolutions[i]
            assert resolution.HasField("status") == bool(n % 2)


def test_an_answer_refused_for_another_reason_is_not_sent_again(
    refusing_host: RefusingHost, start_plugin: Any
) -> None:
    refusing_host.refuse_resolve = [grpc.StatusCode.INTERNAL]
    start_plugin("admit")
    refused = refusing_host.ask(Pin("a/b", hex_id(1)))
    # Handlers run at once, so answers may go out in any order: the next
    # check is asked once the first answer (the one refused) has been sent.
    assert wait_until(lambda: refusing_host.resolve_attempts[refused] == 1)
    later = refusing_host.ask(Pin("a/b", hex_id(2)))
    assert refusing_host.resolved([later])
    assert wait_until(lambda: any("cannot resolve admission" in line for line in refusing_host.logs))
    with refusing_host.lock:
        assert refusing_host.resolve_attempts[refused] == 1
        assert refused not in refusing_host.resolutions
        warning = next(line for line in refusing_host.logs if "cannot resolve admission" in line)
    assert refused in warning
    assert "INTERNAL: refused for the test" in warning


def test_log_records_refused_for_capacity_are_sent_again_in_order(
    refusing_host: RefusingHost, start_plugin: Any
) -> None:
    refusing_host.refuse_log = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
    start_plugin("log")
    assert refusing_host.resolved([refusing_host.ask(Pin("a/b", hex_id(1)))])
    lines = ["a debug line", "an info line", "a warning line", "an error line"]
    assert wait_until(lambda: len(refusing_host.logs) >= len(lines))
    with refusing_host.lock:
        assert refusing_host.logs == lines
        assert refusing_host.refuse_log == []


def test_a_refused_protocol_version_still_exits_3(refusing_host: RefusingHost, start_plugin: Any) -> None:
    # The stream is read on the thread that iterates it: its refusal still
    # reaches the plugin as the host's answer, not as a stop.
    plugin = start_plugin("wrong-version")
    assert plugin.wait(30) == 3


@pytest.mark.parametrize("stuck_in", ["user code", "a host call"])
def test_stdin_eof_with_many_handlers_stuck_exits_within_about_a_second(
    refusing_host: RefusingHost, start_plugin: Any, stuck_in: str
) -> None:
    # "workers": each handler waits for metadata that does not come.
    plugin = start_plugin("stuck-handler") if stuck_in == "user code" else start_plugin("workers", "300")
    for n in range(300):
        refusing_host.ask(Pin("a/b", hex_id(n)))
    if stuck_in == "a host call":
        assert wait_until(lambda: refusing_host.metadata_calls == 300, 30)
    else:
        time.sleep(1.0)  # the handlers start and get stuck
    assert plugin.poll() is None
    started = time.monotonic()
    plugin.stdin.close()
    assert plugin.wait(10) == 0
    # SDK_STOP_GRACE (0.5 s) and an interpreter's exit; the host would SIGTERM after 1 s.
    assert time.monotonic() - started < 2.0


# -- The Log handler in the plugin process -----------------------------------------


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "refused for the test"


class LogChannel:
    """A channel whose Log calls fail with ``refuse`` while it is set, and are recorded otherwise."""

    def __init__(self) -> None:
        self.refuse: grpc.StatusCode | None = None
        self.sent: list[str] = []
        self.attempts = 0

    def unary_unary(self, method: str, **_: Any) -> Any:
        def call(request: plugin_pb2.LogRequest, **__: Any) -> Empty:
            self.attempts += 1
            if self.refuse is not None:
                raise _Refusal(self.refuse)
            self.sent.append(request.message)
            return Empty()

        return call


def test_log_records_refused_past_the_retry_limit_are_counted_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "SDK_LOG_RETRY_LIMIT", 0.2)
    channel = LogChannel()
    channel.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
    handler = logs.HostLogHandler(channel)  # type: ignore[arg-type]
    handler.install()
    log = logging.getLogger("test-sdk-concurrency")
    try:
        log.warning("lost one")
        log.warning("lost two")
        assert wait_until(lambda: handler.dropped == 2)
        assert channel.attempts > 2  # each was tried again before it was dropped
        channel.refuse = None
        log.warning("delivered")
        assert wait_until(lambda: len(channel.sent) == 2)
        assert channel.sent == ["2 log records were dropped", "delivered"]
    finally:
        handler.uninstall(timeout=1.0)


def test_log_records_of_a_host_that_is_gone_are_not_retried(capsys: pytest.CaptureFixture[str]) -> None:
    channel = LogChannel()
    channel.refuse = grpc.StatusCode.UNAVAILABLE
    handler = logs.HostLogHandler(channel)  # type: ignore[arg-type]
    handler.install()
    try:
        logging.getLogger("test-sdk-concurrency").warning("nobody to tell")
        assert wait_until(lambda: handler.dropped == 1)
        assert channel.attempts == 1
    finally:
        handler.uninstall(timeout=1.0)
    # What the host never heard of ends on stderr, which the host logs too.
    assert "1 log records could not be sent to the host" in capsys.readouterr().err


# -- The thread pool ---------------------------------------------------------------


class Gate:
    """Calls that record how many of them run at once and wait to be let go."""

    def __init__(self, pool: DaemonThreads) -> None:
        self.pool = pool
        self.release = threading.Event()
        # Guards the fields below.
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.finished = 0

    def _enter(self) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)

    def _exit(self) -> None:
        with self.lock:
            self.active -= 1
            self.finished += 1

    def hold(self) -> None:
        self._enter()
        self.release.wait(30)
        self._exit()

    def hold_waiting(self) -> None:
        self._enter()
        with self.pool.waiting():
            self.release.wait(30)
        self._exit()


@pytest.fixture
def pools() -> Iterator[Any]:
    made: list[DaemonThreads] = []

    def make(limit: int, **kwargs: Any) -> DaemonThreads:
        pool = DaemonThreads(limit, name="test-pool", **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.stop(5)


def test_the_pool_runs_at_most_max_running_calls_at_once(pools: Any) -> None:
    pool = pools(10, max_running=3, patience=60)
    gate = Gate(pool)
    for _ in range(8):
        pool.run_soon(gate.hold)
    assert wait_until(lambda: gate.active == 3)
    time.sleep(0.2)
    assert gate.peak == 3
    gate.release.set()
    assert wait_until(lambda: gate.finished == 8)
    assert gate.peak == 3


def test_calls_that_say_they_wait_do_not_count_as_running(pools: Any) -> None:
    pool = pools(10, max_running=2, patience=60)
    gate = Gate(pool)
    for _ in range(15):
        pool.run_soon(gate.hold_waiting)
    # All the threads there are, and no more.
    assert wait_until(lambda: gate.active == 10)
    time.sleep(0.2)
    assert gate.peak == 10
    assert pool.thread_count == 10
    gate.release.set()
    assert wait_until(lambda: gate.finished == 15)


def test_calls_running_past_patience_are_presumed_waiting(pools: Any) -> None:
    pool = pools(6, max_running=1, patience=0.05)
    gate = Gate(pool)
    for _ in range(6):
        pool.run_soon(gate.hold)
    # One at a time at first, then the others get the turns of those stuck.
    assert wait_until(lambda: gate.active == 6)
    gate.release.set()
    assert wait_until(lambda: gate.finished == 6)


def test_a_burst_of_waiting_calls_all_run_and_the_threads_stay_bounded(pools: Any) -> None:
    # Threads never expire here: a call stranded in the backlog would wait forever.
    pool = pools(200, max_running=4, patience=60, idle_expiry=600)
    done = threading.Semaphore(0)
    peak_threads = 0

    def call() -> None:
        with pool.waiting():
            time.sleep(0.02)
        done.release()

    for _ in range(3):  # cold, then with the threads of the last burst idle
        for _ in range(1000):
            pool.run_soon(call)
            peak_threads = max(peak_threads, pool.thread_count)
        for _ in range(1000):
            assert done.acquire(timeout=30)
    assert peak_threads <= 200


def test_a_caller_starts_at_most_the_first_thread_of_a_stream_of_slow_calls(
    pools: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's server loop submits a repository's calls one by one as they
    # come: a caller that started a thread whenever none was idle would wait
    # for each one to run (Thread.start does), once for every thread the
    # slow calls need. A spare, started by a pool thread, takes the next call.
    starters: list[str] = []
    start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        if thread.name.startswith("test-pool-"):
            starters.append(threading.current_thread().name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    pool = pools(1 << 20, idle_expiry=600)
    calls = [pool.submit(time.sleep, 0.05)]
    for _ in range(60):
        time.sleep(0.002)
        calls.append(pool.submit(time.sleep, 0.05))
    assert [call.result(30) for call in calls] == [None] * len(calls)
    caller = threading.current_thread().name
    assert starters.count(caller) == 1, starters
    # Enough threads for the calls that overlapped, and one spare at most.
    assert len(starters) <= len(calls) + 1
    assert pool.thread_count == len(starters)


@pytest.mark.parametrize("burst", [1, 10, 300])
def test_a_burst_gets_a_thread_for_each_call_and_one_spare(pools: Any, burst: int) -> None:
    pool = pools(1 << 20, idle_expiry=600)
    release = threading.Event()
    calls = [pool.submit(release.wait, 30) for _ in range(burst)]
    assert wait_until(lambda: pool.thread_count == burst + 1)
    time.sleep(0.1)
    assert pool.thread_count == burst + 1
    release.set()
    assert all(call.result(30) for call in calls)


def test_a_spare_never_takes_the_pool_past_its_limits(pools: Any) -> None:
    pool = pools(5, idle_expiry=600)
    release = threading.Event()
    calls = [pool.submit(release.wait, 30) for _ in range(5)]
    assert wait_until(lambda: pool.thread_count == 5)
    time.sleep(0.1)
    assert pool.thread_count == 5
    release.set()
    assert all(call.result(30) for call in calls)

    bounded = pools(50, max_running=2, patience=60, idle_expiry=600)
    gate = Gate(bounded)
    for _ in range(6):
        bounded.run_soon(gate.hold)
    assert wait_until(lambda: gate.active == 2)
    time.sleep(0.2)
    # The two running and one spare: the queued calls wait for room, not threads.
    assert gate.peak == 2 and bounded.thread_count <= 3
    gate.release.set()
    assert wait_until(lambda: gate.finished == 6)


def test_a_storm_of_mixed_calls_leaves_the_pool_whole(pools: Any) -> None:
    # Quick calls, calls that wait (nested too), calls that block unseen past
    # patience: all finish, and afterwards the pool runs max_running at once
    # again (its counts of running and starting threads are back to zero).
    pool = pools(64, max_running=3, patience=0.02, idle_expiry=600)
    done = threading.Semaphore(0)

    def call(kind: int) -> None:
        if kind == 1:
            with pool.waiting():
                time.sleep(0.005)
        elif kind == 2:
            time.sleep(0.03)  # presumed waiting
        elif kind == 3:
            with pool.waiting(), pool.waiting():
                time.sleep(0.002)
            time.sleep(0.001)
        done.release()

    for n in range(800):
        pool.run_soon(call, n % 4)
    for _ in range(800):
        assert done.acquire(timeout=60)
    gate = Gate(pool)
    for _ in range(3):
        pool.run_soon(gate.hold)
    assert wait_until(lambda: gate.active == 3)
    gate.release.set()


def test_idle_threads_expire_and_the_pool_starts_new_ones(pools: Any) -> None:
    pool = pools(8, idle_expiry=0.1)
    assert [f.result(10) for f in [pool.submit(time.sleep, 0.05) for _ in range(8)]] == [None] * 8
    assert wait_until(lambda: pool.thread_count == 0)
    assert pool.submit(lambda: 42).result(10) == 42


def test_stop_runs_what_is_queued_unless_cancelled(pools: Any) -> None:
    pool = pools(1)
    gate = threading.Event()
    first = pool.submit(gate.wait, 10)
    queued = [pool.submit(lambda n=n: n) for n in range(3)]
    pool.stop(0)
    with pytest.raises(RuntimeError, match="stopped"):
        pool.submit(lambda: None)
    gate.set()
    assert first.result(10) is True
    assert [f.result(10) for f in queued] == [0, 1, 2]

    other = pools(1)
    gate.clear()
    other.submit(gate.wait, 10)
    dropped = other.submit(lambda: None)
    other.stop(0, cancel_futures=True)
    gate.set()
    assert dropped.cancelled()


def test_run_soon_logs_what_its_call_raises(pools: Any, caplog: pytest.LogCaptureFixture) -> None:
    pool = pools(1)
    with caplog.at_level(logging.ERROR, logger="cipdplugin.threads"):
        pool.run_soon(_raise, ValueError("boom"))
        assert wait_until(lambda: any("boom" in (r.exc_text or "") for r in caplog.records))
    # The thread survives it.
    assert pool.submit(lambda: 7).result(10) == 7


def _raise(error: Exception) -> None:
    raise error


def test_denials_and_errors_still_reach_the_host_unchanged() -> None:
    # The answers go out without the handler's thread waiting: check a mix.
    repository = SlowRepository(0.0)
    with Host(Config(SERVICE_URL, repository)) as host:
        plugin = host.new_admission_plugin(plugin_cmd("admit"))
        outcomes = [
            plugin.check_admission(Pin(f"{kind}/b", hex_id(n)))
            for n in range(60)
            for kind in ("a", "deny", "error")
        ]
        results = [f.exception(timeout=60) for f in outcomes]
    assert results[0::3] == [None] * 60
    assert all(isinstance(e, AdmissionDenied) for e in results[1::3])
    assert all(
        isinstance(e, AdmissionError) and e.code is grpc.StatusCode.PERMISSION_DENIED for e in results[2::3]
    )
