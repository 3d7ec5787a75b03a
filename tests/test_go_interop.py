"""The Go CIPD client in the loop: luci-go's own plugin host and plugin SDK,
as the binaries of ../shared/anchors/bin, against ours, both ways.

* The Go host (``go-host-driver``) drives plugins built with our SDK
  (``tests/plugins/go_peer_plugin.py`` does what luci's Go plugins do), and
  each result is compared with the same run against the Go plugin.
* Our host drives ``go-plugin-trivial``, ``go-example-plugin`` and
  ``go-rpc-probe-plugin``, and each result is compared with the Go host's on
  the same pins, run live in the same test.
* The values of ``cipdplugin/constants.py`` that a binary can show (page
  size, ticket length, handshake fields, stop grace, kill deadline, message
  limit, connect timeout) are compared with what the binaries do.

Every test here needs the binaries (the ``go_binaries`` fixture): without
them it skips, naming the folder, and fails instead where
``CIPDPLUGIN_REQUIRE_GO_BINARIES`` is set (CI).
"""

from __future__ import annotations

import base64
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp

from cipdplugin import (
    AdmissionDenied,
    AdmissionError,
    AdmissionPlugin,
    Config,
    InstanceMetadata,
    ListMetadataRequest,
    ListMetadataResponse,
    Pin,
    PluginStartError,
    StaticRepository,
)
from cipdplugin.constants import (
    DEFAULT_CONNECT_TIMEOUT,
    KILL_DEADLINE,
    MAX_MESSAGE_BYTES,
    SDK_PAGE_SIZE,
    SDK_STOP_GRACE,
    STOP_GRACE,
    TICKET_BYTES,
)
from cipdplugin.host.checks import admission_id
from cipdplugin.plugins import parse_handshake
from cipdplugin.protocol import PROTOCOL_VERSION, cipd_pb2, plugin_pb2
from tests.conftest import (
    CLOSE_MARGIN,
    FailingRepository,
    HostFactory,
    Records,
    plugin_cmd,
    running,
)
from tests.go_anchors import (
    BAD_PACKAGE,
    DRIVER_WARM_UP,
    EXPERIMENTAL,
    GO_PROBE_TABLE,
    GO_SERVICE_URL,
    NO_ENTRIES,
    PROBE_LINE,
    DriverRun,
    driver_pins,
    go_binary,
    peer_plugin_cmd,
    run_driver,
)
from tests.plain_grpc import protocol_handlers, stream_from

pytestmark = pytest.mark.usefixtures("go_binaries")

#: Bound on every verdict awaited here.
VERDICT_WAIT = 60.0
#: How long the Go host keeps a probe plugin before closing (see probe_flags).
PROBE_LINGER = 1.0
ALLOWED_KEY = "allowed-sha256"


# -- Verdicts, tallied as go-host-driver tallies them --------------------------------


def go_code_name(code: grpc.StatusCode) -> str:
    """A status code as Go's ``codes.Code`` prints it (``FailedPrecondition``)."""
    if code is grpc.StatusCode.OK:
        return "OK"
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(word.capitalize() for word in code.name.split("_"))


@dataclass
class Tally:
    """Verdicts of a run of checks, in go-host-driver's terms."""

    admitted: int = 0
    denied: int = 0
    denied_messages: set[str] = field(default_factory=set)
    #: Distinct ``code = <Go code> desc = <message>`` of the other failures.
    errors: set[str] = field(default_factory=set)
    error_count: int = 0

    @classmethod
    def of_driver(cls, run: DriverRun) -> Tally:
        """The Go host's verdicts on its ``n`` pins (its warm-up pin aside)."""
        errors = {
            line.split("rpc error: ", 1)[1]
            for line in run.stderr.splitlines()
            if line.startswith("go-host-driver: error verdict: rpc error: ")
        }
        return cls(run["admitted"], run["denied"], set(run["denied_messages"]), errors, run["errors"])

    def add(self, error: BaseException | None) -> None:
        if error is None:
            self.admitted += 1
        elif isinstance(error, AdmissionDenied):
            self.denied += 1
            self.denied_messages.add(error.message)
        else:
            assert isinstance(error, AdmissionError), repr(error)
            self.error_count += 1
            self.errors.add(f"code = {go_code_name(error.code)} desc = {error.message}")


def our_tally(plugin: AdmissionPlugin, pins: list[Pin], warm_up: Pin = DRIVER_WARM_UP) -> Tally:
    """Check ``warm_up`` alone, then every pin at once, as the Go driver does; tally the pins."""
    plugin.check_admission(warm_up).exception(VERDICT_WAIT)
    promises = [plugin.check_admission(pin) for pin in pins]
    tally = Tally()
    for promise in promises:
        tally.add(promise.exception(VERDICT_WAIT))
    return tally


def digest_metadata(pin: Pin, entries: int) -> list[InstanceMetadata]:
    """``entries`` allowed-sha256 entries of ``pin``, newest first: decoys, then its real digest
    (go-host-driver's ``-md-entries``)."""
    digest = pin.object_ref.hex_digest
    values = [f"{n:064x}" for n in range(entries - 1)] + [digest]
    return [
        InstanceMetadata(key=ALLOWED_KEY, value=value.encode(), attached_ts=Timestamp(seconds=10_000 - n))
        for n, value in enumerate(values)
    ]


class CountingRepository:
    """A repository that counts its ListMetadata calls."""

    def __init__(self, inner: StaticRepository) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.calls = 0

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        with self._lock:
            self.calls += 1
        return self._inner.list_metadata(request)


# -- The Go host drives our SDK ------------------------------------------------------


def test_go_host_gets_the_verdicts_of_go_plugin_trivial_from_our_sdk() -> None:
    flags = ("-n", "40", "-deny-every", "4", "-expect", "admit", "-log-level", "debug")
    ours = run_driver(peer_plugin_cmd("trivial"), *flags)
    theirs = run_driver([go_binary("go-plugin-trivial")], *flags)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert Tally.of_driver(ours) == Tally.of_driver(theirs) == Tally(30, 10, {BAD_PACKAGE})
    assert ours["mismatches"] == theirs["mismatches"] == 0
    # The ListAdmissions request reached the Go host: version 1 (it refuses
    # any other), and our plugin's version string.
    assert 'Using deployment admission plugin "go-peer-plugin 1.0"' in ours.stderr


def test_go_host_reports_our_handler_exception_as_an_aborted_verdict() -> None:
    run = run_driver(peer_plugin_cmd("raise"), "-n", "5")
    message = "the admission handler raised RuntimeError: policy exploded"
    assert run.returncode == 1
    assert Tally.of_driver(run) == Tally(0, 0, set(), {f"code = Aborted desc = {message}"}, 5)
    assert f"warm-up pin good/warm-up: rpc error: code = Aborted desc = {message}" in run.stderr


@pytest.mark.parametrize("entries", [1, SDK_PAGE_SIZE, SDK_PAGE_SIZE + 1, 45])
def test_go_host_pages_metadata_for_our_sdk_as_for_luci_sdk(entries: int) -> None:
    flags = ["-n", "20", "-allow-md", "-md-entries", str(entries), "-deny-every", "10"]
    flags += ["-deny-prefix", "experimental/pkg/", "-expect", "admit"]
    ours = run_driver(peer_plugin_cmd("example"), *flags)
    theirs = run_driver([go_binary("go-example-plugin")], *flags)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert Tally.of_driver(ours) == Tally.of_driver(theirs) == Tally(18, 2, {EXPERIMENTAL})
    # The warm-up pin and the 18 admitted pins read every entry (the real
    # digest is the last); the 2 experimental pins read none. The driver's
    # repository hands out a page token only while entries remain, so each
    # pin takes ceil(entries / page size) calls: luci's SDK and ours both
    # page SDK_PAGE_SIZE (20) entries at a time.
    reading = 18 + 1
    assert ours["metadata_calls"] == theirs["metadata_calls"] == reading * math.ceil(entries / SDK_PAGE_SIZE)


def test_go_host_without_a_repository_fails_the_metadata_read_of_both_sdks_alike() -> None:
    flags = ("-n", "4", "-deny-every", "4", "-deny-prefix", "experimental/pkg/")
    ours = run_driver(peer_plugin_cmd("example"), *flags)
    theirs = run_driver([go_binary("go-example-plugin")], *flags)
    unimplemented = "code = Unimplemented desc = a RepositoryClient implementation is not provided"
    assert Tally.of_driver(ours) == Tally.of_driver(theirs) == Tally(0, 1, {EXPERIMENTAL}, {unimplemented}, 3)


@pytest.mark.parametrize("plugin_close", [False, True], ids=["host-close", "plugin-close-first"])
def test_our_plugin_leaves_promptly_when_the_go_host_closes(plugin_close: bool) -> None:
    flags = ("-n", "10", *(["-plugin-close"] if plugin_close else []))
    ours = run_driver(peer_plugin_cmd("trivial"), *flags)
    assert ours.returncode == 0, ours.stderr
    # The Go host closes the plugin's stdin (after stopping its server, or
    # ending the stream with ABORTED) and kills it only at its 5 s deadline:
    # close_ms says whether our SDK left on its own, within its grace.
    assert ours["close_ms"] < (SDK_STOP_GRACE + CLOSE_MARGIN) * 1000, ours.report
    assert ours["close_ms"] < KILL_DEADLINE * 1000 / 2


def test_go_handshake_has_our_fields_and_ticket_length(tmp_path: Path, make_host: HostFactory) -> None:
    go_line = tmp_path / "go-handshake"
    run = run_driver(peer_plugin_cmd("trivial", "--handshake", str(go_line)), "-n", "1")
    assert run.returncode == 0, run.stderr
    our_line = tmp_path / "our-handshake"
    host = make_host(Config(GO_SERVICE_URL))
    plugin = host.new_admission_plugin(peer_plugin_cmd("trivial", "--handshake", str(our_line)))
    assert plugin.check_admission(DRIVER_WARM_UP).exception(VERDICT_WAIT) is None
    ticket_length = len(base64.b64encode(bytes(TICKET_BYTES)).rstrip(b"="))
    for line in (go_line.read_text("latin-1"), our_line.read_text("latin-1")):
        fields = json.loads(line)
        assert set(fields) == {"port", "ticket"}
        assert isinstance(fields["port"], int)
        ticket = fields["ticket"]
        # Standard base64 without padding of TICKET_BYTES random bytes.
        assert len(ticket) == ticket_length
        assert not set(ticket) & set("-_=")
        assert len(base64.b64decode(ticket + "=" * (-len(ticket) % 4), validate=True)) == TICKET_BYTES
        # Our SDK parsed it (the plugin answered), and so does the parser alone.
        assert parse_handshake(line).ticket == ticket
    # Ours is compact JSON; the Go host's is protojson, whose spacing varies
    # by build (this one writes a space after the comma).
    ours = our_line.read_text("latin-1")
    assert ours == json.dumps(json.loads(ours), separators=(",", ":"))


def test_go_admission_ids_are_ours_and_the_driver_pins_are_known(tmp_path: Path) -> None:
    record = tmp_path / "admissions.jsonl"
    run = run_driver(peer_plugin_cmd("trivial", "--record", str(record)), "-n", "8", "-deny-every", "4")
    assert run.returncode == 0, run.stderr
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    # The warm-up first; the rest in any order (handlers run concurrently).
    assert seen[0]["package"] == DRIVER_WARM_UP.package
    pins = {Pin(entry["package"], entry["instance_id"]) for entry in seen}
    assert pins == {DRIVER_WARM_UP, *driver_pins(8, 4)}
    salt = str(run.pid).encode()  # the Go host's salt is its process ID, as ours
    for entry in seen:
        admission = plugin_pb2.Admission(
            service_url=entry["service_url"],
            package=entry["package"],
            instance=cipd_pb2.ObjectRef(hash_algo=entry["hash_algo"], hex_digest=entry["hex_digest"]),
        )
        assert entry["service_url"] == GO_SERVICE_URL
        assert admission_id(admission, salt) == entry["admission_id"]


# -- Our host drives Go plugins ---------------------------------------------------------


def test_our_host_gets_the_go_hosts_verdicts_from_go_plugin_trivial(make_host: HostFactory) -> None:
    theirs = run_driver([go_binary("go-plugin-trivial")], "-n", "40", "-deny-every", "4")
    host = make_host(Config(GO_SERVICE_URL))
    plugin = host.new_admission_plugin([go_binary("go-plugin-trivial")])
    ours = our_tally(plugin, driver_pins(40, 4))
    assert ours == Tally.of_driver(theirs) == Tally(30, 10, {BAD_PACKAGE})
    error = plugin.check_admission(driver_pins(4, 4)[3]).exception(VERDICT_WAIT)
    assert isinstance(error, AdmissionDenied)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION


def test_a_burst_of_answers_beyond_grpcs_pending_call_limit_is_served(make_host: HostFactory) -> None:
    """luci's SDK sends one ResolveAdmission per check at once, and drops an
    answer that is refused. grpc's core refuses calls waiting to be served
    beyond 1,000 (or 3,000) unless told otherwise: every answer arrives."""
    host = make_host(Config(GO_SERVICE_URL))
    plugin = host.new_admission_plugin([go_binary("go-plugin-trivial")], check_timeout=30)
    pins = driver_pins(6000)
    promises = [plugin.check_admission(pin) for pin in pins]
    failed = [error for error in (promise.exception(90) for promise in promises) if error is not None]
    assert not failed, (len(failed), failed[:3])


@pytest.mark.parametrize("entries", [1, 45])
def test_our_host_gets_the_go_hosts_verdicts_from_go_example_plugin(
    make_host: HostFactory, entries: int
) -> None:
    flags = ("-n", "30", "-allow-md", "-md-entries", str(entries))
    theirs = run_driver(
        [go_binary("go-example-plugin")], *flags, "-deny-every", "10", "-deny-prefix", "experimental/pkg/"
    )
    pins = driver_pins(30, 10, "experimental/pkg/")
    repository = CountingRepository(
        StaticRepository({pin: digest_metadata(pin, entries) for pin in [DRIVER_WARM_UP, *pins]})
    )
    host = make_host(Config(GO_SERVICE_URL, repository))
    plugin = host.new_admission_plugin([go_binary("go-example-plugin")])
    ours = our_tally(plugin, pins)
    assert ours == Tally.of_driver(theirs) == Tally(27, 3, {EXPERIMENTAL})
    assert repository.calls == theirs["metadata_calls"]


def test_go_example_plugin_and_ours_agree_under_our_host(make_host: HostFactory) -> None:
    """The Go driver's repository always holds the digest; ours can also
    hold none, only decoys, or fail, and both plugins must say the same."""
    no_entries, decoys, good, experimental = (Pin(f"p/{n}", driver_pins(4)[n].instance_id) for n in range(4))
    experimental = Pin("experimental/x", experimental.instance_id)
    repository = StaticRepository({good: digest_metadata(good, 3), decoys: digest_metadata(decoys, 4)[:3]})
    verdicts: dict[str, list[str]] = {}
    for name, cmdline in (("go", [go_binary("go-example-plugin")]), ("ours", peer_plugin_cmd("example"))):
        for config in (
            Config(GO_SERVICE_URL, repository),
            Config(
                GO_SERVICE_URL,
                FailingRepository(AdmissionError("the backend is down", code=grpc.StatusCode.UNAVAILABLE)),
            ),
        ):
            plugin = make_host(config).new_admission_plugin(cmdline)
            for pin in (no_entries, decoys, good, experimental):
                error = plugin.check_admission(pin).exception(VERDICT_WAIT)
                assert error is None or isinstance(error, AdmissionError), repr(error)
                verdict = (
                    "admitted"
                    if error is None
                    else f"{type(error).__name__} {error.code.name} {error.message}"
                )
                verdicts.setdefault(name, []).append(verdict)
    assert verdicts["ours"] == verdicts["go"]
    assert verdicts["go"] == [
        f"AdmissionDenied FAILED_PRECONDITION {NO_ENTRIES}",
        'AdmissionDenied FAILED_PRECONDITION evaluated 3 metadata entries with key "allowed-sha256" '
        "and none is valid",
        "admitted",
        f"AdmissionDenied FAILED_PRECONDITION {EXPERIMENTAL}",
        "AdmissionError UNAVAILABLE the backend is down",
        "AdmissionError UNAVAILABLE the backend is down",
        "AdmissionError UNAVAILABLE the backend is down",
        f"AdmissionDenied FAILED_PRECONDITION {EXPERIMENTAL}",
    ]


class GatedRepository:
    """A repository whose calls wait until ``release()`` (at most a minute),
    answering allowed-sha256 = the instance's digest; it counts its calls."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        with self._lock:
            self.calls += 1
        self.gate.wait(VERDICT_WAIT)
        digest = request.instance.hex_digest.encode()
        return ListMetadataResponse(metadata=[InstanceMetadata(key=ALLOWED_KEY, value=digest)])

    def settled_calls(self) -> int:
        """The call count once it has stopped growing for half a second (bounded)."""
        deadline = time.monotonic() + VERDICT_WAIT
        last = -1
        while self.calls != last and time.monotonic() < deadline:
            last = self.calls
            time.sleep(0.5)
        return last


def test_every_check_of_go_example_plugin_resolves_when_its_metadata_calls_pile_up(
    make_host: HostFactory,
) -> None:
    repository = GatedRepository()
    host = make_host(Config(GO_SERVICE_URL, repository))
    plugin = host.new_admission_plugin([go_binary("go-example-plugin")])
    repository.gate.set()
    assert plugin.check_admission(DRIVER_WARM_UP).exception(VERDICT_WAIT) is None
    repository.gate.clear()
    # luci's example plugin asks for every pin's metadata at once (a goroutine
    # each), so 300 checks hold 300 metadata calls until the gate opens.
    good = [plugin.check_admission(pin) for pin in driver_pins(300)]
    assert repository.settled_calls() > 200
    # Denied by name: answered at once, while the metadata calls are held.
    experimental = [
        plugin.check_admission(Pin(f"experimental/pkg/{n}", pin.instance_id))
        for n, pin in enumerate(driver_pins(10))
    ]
    time.sleep(0.5)
    repository.gate.set()
    # Every check resolves: admitted, denied, or failed (a metadata call
    # refused for capacity is the plugin's error to report), never lost.
    _, pending = futures.wait(good + experimental, timeout=10)
    assert not pending, f"{len(pending)} of {len(good) + len(experimental)} checks never resolved"
    for promise in experimental:
        assert isinstance(promise.exception(), AdmissionDenied)


# -- The probe plugin: the protocol spoken by hand ----------------------------------------


def probe_codes(records: Records, last: str) -> dict[str, str]:
    """The probe lines our host forwarded from the plugin's stderr, once ``last`` is among them."""
    assert records.wait_for(f"stderr: probe {last} ", VERDICT_WAIT), records.messages()
    codes: dict[str, str] = {}
    for _, message in records.messages():
        if "stderr: probe " in message:
            match = PROBE_LINE.search(message.split("stderr: ", 1)[1])
            assert match is not None, message
            codes[match.group(1)] = match.group(2)
    return codes


def probe_flags(with_repository: bool) -> list[str]:
    """go-host-driver's flags for a probe run. It lingers before closing:
    the probes that run beside its checks would otherwise meet a stopped
    server (Unavailable) on a busy machine."""
    return ["-n", "1", "-linger", f"{PROBE_LINGER}s", *(["-allow-md"] if with_repository else [])]


@pytest.mark.parametrize("with_repository", [False, True], ids=["no-repository", "repository"])
def test_probe_codes_of_our_host_are_the_go_hosts(
    logged_host: HostFactory, records: Records, with_repository: bool
) -> None:
    probe = [go_binary("go-rpc-probe-plugin"), "-no-v2"]
    with futures.ThreadPoolExecutor(1) as pool:  # the Go host runs meanwhile
        live_future = pool.submit(run_driver, probe, *probe_flags(with_repository))
        host = logged_host(Config(GO_SERVICE_URL, StaticRepository() if with_repository else None))
        plugin = host.new_admission_plugin(probe)
        assert plugin.check_admission(DRIVER_WARM_UP).exception(VERDICT_WAIT) is None
        ours = probe_codes(records, "ResolveAdmission.unknown_id")
        live = live_future.result(VERDICT_WAIT)
    assert live.returncode == 0, live.stderr
    column = 1 if with_repository else 0
    table = {
        name: row[column]
        for name, row in GO_PROBE_TABLE.items()
        if name != "ListAdmissions.protocol_version_2"
    }
    assert ours == table
    assert live.probes() == table


@pytest.mark.parametrize("with_repository", [False, True], ids=["no-repository", "repository"])
def test_protocol_version_2_is_refused_as_the_go_host_refuses_it(
    logged_host: HostFactory, records: Records, with_repository: bool
) -> None:
    probe = [go_binary("go-rpc-probe-plugin")]
    with futures.ThreadPoolExecutor(1) as pool:  # the Go host runs meanwhile
        live_future = pool.submit(run_driver, probe, *probe_flags(with_repository))
        host = logged_host(Config(GO_SERVICE_URL, StaticRepository() if with_repository else None))
        plugin = host.new_admission_plugin(probe)
        error = plugin.check_admission(DRIVER_WARM_UP).exception(VERDICT_WAIT)
        name = "ListAdmissions.protocol_version_2"
        ours = probe_codes(records, name)[name]
        live = live_future.result(VERDICT_WAIT)
    # The Go host answers each check of a refused plugin with the refusal.
    refusal = f"unknown protocol version 2: expecting {PROTOCOL_VERSION}"
    assert Tally.of_driver(live) == Tally(0, 1, {refusal})
    assert isinstance(error, PluginStartError)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "version 2" in error.message
    assert ours == live.probes()[name] == GO_PROBE_TABLE[name][1 if with_repository else 0]


# -- Stopping: the stop grace and the kill deadline --------------------------------------


def _timed(action: Any) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def test_stop_grace_and_kill_deadline_beside_the_go_host(make_host: HostFactory) -> None:
    """Two plugins that miss stdin's EOF, each stopped by our host and by the
    Go host, all four at once (each waits out a 5 s deadline)."""
    # go-rpc-probe-plugin -ignore-eof ignores EOF and SIGTERM: only SIGKILL ends it.
    stubborn = [go_binary("go-rpc-probe-plugin"), "-no-v2", "-ignore-eof"]
    # admission_plugin.py "ignore-eof" ignores EOF and dies of SIGTERM.
    deaf = plugin_cmd("ignore-eof")
    with futures.ThreadPoolExecutor(4) as pool:
        live_stubborn = pool.submit(run_driver, stubborn, "-n", "1")
        live_deaf = pool.submit(run_driver, deaf, "-n", "1")
        stubborn_host, deaf_host = make_host(Config(GO_SERVICE_URL)), make_host(Config(GO_SERVICE_URL))
        for host, cmdline in ((stubborn_host, stubborn), (deaf_host, deaf)):
            plugin = host.new_admission_plugin(cmdline)
            assert plugin.check_admission(DRIVER_WARM_UP).exception(VERDICT_WAIT) is None
        pids = {
            child.pid
            for child in psutil.Process().children()
            if child.cmdline()[:1] == [go_binary("go-rpc-probe-plugin")]
        }
        assert len(pids) == 1  # ours; the Go host's is its own child
        stubborn_close = pool.submit(_timed, stubborn_host.close)
        deaf_close = pool.submit(_timed, deaf_host.close)
        elapsed = {"stubborn": stubborn_close.result(VERDICT_WAIT), "deaf": deaf_close.result(VERDICT_WAIT)}
        go_close = {
            "stubborn": live_stubborn.result(VERDICT_WAIT)["close_ms"] / 1000,
            "deaf": live_deaf.result(VERDICT_WAIT)["close_ms"] / 1000,
        }
    assert not any(running(pid) for pid in pids)
    # The kill deadline: both hosts SIGKILL the stubborn plugin at 5 s.
    assert KILL_DEADLINE - 0.1 <= elapsed["stubborn"] <= KILL_DEADLINE + CLOSE_MARGIN, elapsed
    assert KILL_DEADLINE - 0.1 <= go_close["stubborn"] <= KILL_DEADLINE + CLOSE_MARGIN, go_close
    # The stop grace: ours SIGTERMs after STOP_GRACE, long before the
    # deadline; the Go host never sends SIGTERM, and kills at the deadline.
    assert STOP_GRACE - 0.05 <= elapsed["deaf"] <= KILL_DEADLINE - 1.0, elapsed
    assert go_close["deaf"] >= KILL_DEADLINE - 0.1, go_close


@pytest.mark.slow
def test_connect_timeout_is_the_go_hosts(make_host: HostFactory) -> None:
    """Both hosts give a plugin that never calls ListAdmissions 30 s (slow: run by make soak)."""
    # Reads stdin to its end and exits: it never connects, and leaves when told.
    silent = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
    with futures.ThreadPoolExecutor(1) as pool:
        live_future = pool.submit(run_driver, silent, "-n", "1")
        host = make_host(Config(GO_SERVICE_URL))
        plugin = host.new_admission_plugin(silent)
        started = time.monotonic()
        error = plugin.check_admission(DRIVER_WARM_UP).exception(DEFAULT_CONNECT_TIMEOUT + 30)
        elapsed = time.monotonic() - started
        live = live_future.result(DEFAULT_CONNECT_TIMEOUT + 60)
    assert isinstance(error, PluginStartError)
    assert DEFAULT_CONNECT_TIMEOUT - 0.5 <= elapsed <= DEFAULT_CONNECT_TIMEOUT + CLOSE_MARGIN
    assert "while waiting for ListAdmissions RPC: context deadline exceeded" in live.stderr
    # The Go host's warm-up check is that first verdict.
    assert (
        DEFAULT_CONNECT_TIMEOUT - 0.5
        <= live["cold_first_ms"] / 1000
        <= DEFAULT_CONNECT_TIMEOUT + CLOSE_MARGIN
    )


# -- The message limit ---------------------------------------------------------------------


def pin_of_admission_size(size: int, salt: bytes) -> Pin:
    """A pin whose Admission (ID included) serializes to exactly ``size`` bytes."""
    instance_id = driver_pins(1)[0].instance_id
    length = size
    while True:
        pin = Pin("big/" + "a" * length, instance_id)
        admission = plugin_pb2.Admission(
            service_url=GO_SERVICE_URL, package=pin.package, instance=pin.object_ref
        )
        admission.admission_id = admission_id(admission, salt)
        if admission.ByteSize() == size:
            return pin
        length += size - admission.ByteSize()


class RawAdmissionsServer:
    """The least a host needs to hand a Go plugin one admission of any size:
    no size check, no ticket check. It exists to show what the Go plugin
    does with a message our host would refuse to send."""

    def __init__(self) -> None:
        self.outbox: queue.Queue[plugin_pb2.Admission | None] = queue.Queue()
        self.resolved: queue.Queue[str] = queue.Queue()
        self.executor = futures.ThreadPoolExecutor(4)
        self.server = grpc.server(
            self.executor,
            handlers=protocol_handlers(list_admissions=self._list, resolve_admission=self._resolve),
            options=[("grpc.so_reuseport", 0)],
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _list(
        self, request: plugin_pb2.ListAdmissionsRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        yield from stream_from(self.outbox, context)

    def _resolve(self, request: plugin_pb2.ResolveAdmissionRequest, context: grpc.ServicerContext) -> Empty:
        self.resolved.put(request.admission_id)
        return Empty()

    def close(self) -> None:
        self.outbox.put(None)
        self.server.stop(None).wait(5)
        self.executor.shutdown(wait=True)


def test_message_limit_is_the_go_plugins(make_host: HostFactory) -> None:
    host = make_host(Config(GO_SERVICE_URL))
    plugin = host.new_admission_plugin([go_binary("go-plugin-trivial")])
    salt = str(os.getpid()).encode()
    # The largest Admission luci's SDK accepts is MAX_MESSAGE_BYTES ...
    largest = pin_of_admission_size(MAX_MESSAGE_BYTES, salt)
    assert plugin.check_admission(largest).exception(VERDICT_WAIT) is None
    # ... one byte more our host refuses alone, and the plugin carries on.
    error = plugin.check_admission(pin_of_admission_size(MAX_MESSAGE_BYTES + 1, salt)).exception(VERDICT_WAIT)
    assert isinstance(error, AdmissionError)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert plugin.check_admission(DRIVER_WARM_UP).exception(VERDICT_WAIT) is None

    # Sent anyway, that byte more breaks the Go plugin: it never answers and exits.
    raw = RawAdmissionsServer()
    process = subprocess.Popen(
        [go_binary("go-plugin-trivial")], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdin is not None
        process.stdin.write(f'{{"port":{raw.port},"ticket":"t"}}\n'.encode())
        process.stdin.flush()
        oversized = plugin_pb2.Admission(admission_id="oversized", service_url=GO_SERVICE_URL)
        oversized.package = "a" * MAX_MESSAGE_BYTES
        oversized.package = "a" * (len(oversized.package) + MAX_MESSAGE_BYTES + 1 - oversized.ByteSize())
        assert oversized.ByteSize() == MAX_MESSAGE_BYTES + 1
        raw.outbox.put(oversized)
        assert process.wait(VERDICT_WAIT) != 0
        assert raw.resolved.empty()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        assert process.stdin is not None
        process.stdin.close()
        assert process.stderr is not None
        process.stderr.close()
        raw.close()
