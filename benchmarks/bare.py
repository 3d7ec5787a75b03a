"""The bare grpcio baselines: the admission messages with no library logic.

``BareAdmissionServer`` and ``run_burst`` (baseline (a) of the throughput
section) and ``BareHost`` (the host side of the Go-paired section, see the
end of this module).

For baseline (a), the host side lives here, in the benchmark's process: a gRPC server on
127.0.0.1 whose ListAdmissions handler is a generator fed by a queue, and
whose ResolveAdmission handler counts answers. The plugin side is
``benchmarks/plugins.py bare-peer`` in its own process. Per check, the same
messages cross the wire as with the library: one ``Admission`` on the
long-lived stream, one ``ResolveAdmissionRequest`` call back. What is left
out is everything the library adds: pins, promises, admission IDs derived by
hashing, tickets, the bounded queue, the SDK's handler plumbing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf.empty_pb2 import Empty

from cipdplugin.pins import Pin
from cipdplugin.protocol import cipd_pb2, plugin_pb2
from tests.plain_grpc import protocol_handlers

PEER = Path(__file__).resolve().parent / "plugins.py"
#: Bound on every wait, so that a broken peer fails the benchmark instead of hanging it.
WAIT_LIMIT = 300.0


class _Bursts:
    """What both bare hosts share: a queue feeding the ListAdmissions stream,
    and a count of the answers still expected in the current burst."""

    #: Who answers, for the error when a burst is not answered in time.
    peer_name = "the peer"

    def __init__(self, service_url: str) -> None:
        self._service_url = service_url
        self._outbox: queue.SimpleQueue[plugin_pb2.Admission | None] = queue.SimpleQueue()
        # Guards the two fields below.
        self._lock = threading.Lock()
        self._remaining = 0  # answers still expected in the current burst
        self._answered = threading.Event()  # set when _remaining reaches 0
        self._next_id = 0

    def _instance(self, pin: Pin) -> cipd_pb2.ObjectRef:
        return pin.object_ref

    def _stream(self) -> Iterator[plugin_pb2.Admission]:
        while True:
            admission = self._outbox.get()  # Cannot hang: close() sends None.
            if admission is None:
                return
            yield admission

    def _count_answer(self) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining == 0:
                self._answered.set()

    def check_all(self, pins: list[Pin]) -> None:
        """Send one Admission per pin and return once every one is answered.

        Raises:
            TimeoutError: no answer to every pin within ``WAIT_LIMIT``.
        """
        with self._lock:
            self._remaining = len(pins)
            self._answered.clear()
        for pin in pins:
            self._next_id += 1
            self._outbox.put(
                plugin_pb2.Admission(
                    admission_id=str(self._next_id),
                    service_url=self._service_url,
                    package=pin.package,
                    instance=self._instance(pin),
                )
            )
        if not self._answered.wait(WAIT_LIMIT):
            raise TimeoutError(f"{self.peer_name} answered {len(pins) - self._remaining} of {len(pins)}")


class BareAdmissionServer(_Bursts):
    """One bare server and its peer process; used for one measurement, then closed.

    ``peer_workers`` is how the peer answers: 0 inline on the stream's
    thread, N from a pool of N threads.
    """

    peer_name = "the bare peer"

    def __init__(self, service_url: str, peer_workers: int) -> None:
        super().__init__(service_url)
        self._connected = threading.Event()
        # A deliberate independent baseline: plain grpcio handlers
        # (tests/plain_grpc.py), nothing of cipdplugin.host, so that the
        # floor it measures owes nothing to the code it is compared with.
        handlers = protocol_handlers(
            list_admissions=self._list_admissions, resolve_admission=self._resolve_admission
        )
        self._executor = futures.ThreadPoolExecutor(64, thread_name_prefix="bare-server")
        self._server = grpc.server(self._executor, handlers=handlers, options=[("grpc.so_reuseport", 0)])
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.peer = subprocess.Popen(
            [sys.executable, str(PEER), "bare-peer", str(port), str(peer_workers)], stdin=subprocess.DEVNULL
        )

    def _instance(self, pin: Pin) -> cipd_pb2.ObjectRef:
        # The floor skips the instance ID's decoding: it is library work.
        return cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA1, hex_digest=pin.instance_id)

    def _list_admissions(self, request: plugin_pb2.ListAdmissionsRequest, context: Any) -> Iterator[Any]:
        self._connected.set()
        yield from self._stream()

    def _resolve_admission(self, request: plugin_pb2.ResolveAdmissionRequest, context: Any) -> Empty:
        self._count_answer()
        return Empty()

    def wait_connected(self) -> None:
        """Wait for the peer's ListAdmissions call.

        Raises:
            TimeoutError: the peer did not connect within ``WAIT_LIMIT``.
        """
        if not self._connected.wait(WAIT_LIMIT):
            raise TimeoutError("the bare peer did not connect")

    def close(self) -> None:
        """End the stream, stop the server and reap the peer."""
        self._outbox.put(None)
        self._server.stop(grace=1.0).wait(5.0)
        self._executor.shutdown(wait=False)
        try:
            self.peer.wait(5.0)
        except subprocess.TimeoutExpired:
            self.peer.kill()
            self.peer.wait()


def run_burst(
    service_url: str, pins: list[Pin], warm_up: Pin, peer_workers: int
) -> tuple[float, float, float]:
    """Time one burst over a fresh bare server and peer, after one warm-up check.

    Returns (seconds, host CPU seconds, peer CPU seconds) of the burst.
    """
    server = BareAdmissionServer(service_url, peer_workers)
    try:
        server.wait_connected()
        server.check_all([warm_up])
        me, peer = psutil.Process(), psutil.Process(server.peer.pid)
        host_cpu, peer_cpu = cpu_seconds(me), cpu_seconds(peer)
        start = time.perf_counter()
        server.check_all(pins)
        elapsed = time.perf_counter() - start
        return elapsed, cpu_seconds(me) - host_cpu, cpu_seconds(peer) - peer_cpu
    finally:
        server.close()


def cpu_seconds(process: psutil.Process) -> float:
    """User plus system CPU time a process has used so far, all its threads."""
    times = process.cpu_times()
    return float(times.user + times.system)


def measure_burst(burst: Callable[[], int], plugins: list[psutil.Process], checks: int) -> dict[str, float]:
    """Run ``burst`` (it returns how many of its ``checks`` failed): its
    seconds, and the CPU per check of this process and of ``plugins``."""

    def plugins_cpu() -> float:
        total = 0.0
        for process in plugins:
            with contextlib.suppress(psutil.Error):  # a plugin that exited counts what it used
                total += cpu_seconds(process)
        return total

    me = psutil.Process()
    host_cpu, plugin_cpu = cpu_seconds(me), plugins_cpu()
    start = time.perf_counter()
    failed = burst()
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "host_cpu_us_per_check": (cpu_seconds(me) - host_cpu) / checks * 1e6,
        "plugin_cpu_us_per_check": (plugins_cpu() - plugin_cpu) / checks * 1e6,
        "failed_checks": float(failed),
    }


class BareHost(_Bursts):
    """A complete plugin host in bare grpcio: the baseline of our host
    driving a Go plugin. One per measurement, then closed.

    It does what any host of the protocol must, and nothing of the library:
    a grpcio server on 127.0.0.1, a 64-byte random ticket, the handshake line
    on the plugin's stdin, the ticket checked on every call (UNAUTHENTICATED
    without one, PERMISSION_DENIED if wrong), a ListAdmissions generator fed
    by a queue, a ResolveAdmission handler that counts answers, and a
    Host.Log that accepts any record. The clock of ``cold_first_seconds``
    starts before the server is built: our host also starts its server with
    the first launch.
    """

    peer_name = "the plugin"

    def __init__(self, service_url: str, cmdline: list[str]) -> None:
        started = time.perf_counter()
        super().__init__(service_url)
        self._ticket = base64.b64encode(secrets.token_bytes(64)).decode("ascii").rstrip("=")
        # A deliberate independent baseline: plain grpcio handlers
        # (tests/plain_grpc.py), nothing of cipdplugin.host.
        handlers = protocol_handlers(
            list_admissions=self._list_admissions, resolve_admission=self._resolve_admission, log=self._log
        )
        self._executor = futures.ThreadPoolExecutor(64, thread_name_prefix="bare-host")
        self._server = grpc.server(self._executor, handlers=handlers, options=[("grpc.so_reuseport", 0)])
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.plugin = subprocess.Popen(cmdline, stdin=subprocess.PIPE)
        assert self.plugin.stdin is not None
        self.plugin.stdin.write(json.dumps({"port": port, "ticket": self._ticket}).encode() + b"\n")
        self.plugin.stdin.flush()
        self._started = started

    def _check_ticket(self, context: grpc.ServicerContext) -> None:
        tickets = [value for key, value in context.invocation_metadata() if key == "x-plugin-ticket"]
        if not tickets:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no ticket in the request")
        if tickets[0] != self._ticket:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "invalid ticket in the request")

    def _list_admissions(self, request: plugin_pb2.ListAdmissionsRequest, context: Any) -> Iterator[Any]:
        self._check_ticket(context)
        yield from self._stream()

    def _resolve_admission(self, request: plugin_pb2.ResolveAdmissionRequest, context: Any) -> Empty:
        self._check_ticket(context)
        self._count_answer()
        return Empty()

    def _log(self, request: plugin_pb2.LogRequest, context: Any) -> Empty:
        self._check_ticket(context)
        return Empty()

    def cold_first_seconds(self, warm_up: Pin) -> float:
        """Check ``warm_up``: the time from this host's start to that first answer."""
        self.check_all([warm_up])
        return time.perf_counter() - self._started

    def close(self) -> None:
        """End the stream, close the plugin's stdin, reap it and stop the server."""
        self._outbox.put(None)
        assert self.plugin.stdin is not None
        self.plugin.stdin.close()
        try:
            self.plugin.wait(5.0)
        except subprocess.TimeoutExpired:
            self.plugin.kill()
            self.plugin.wait()
        self._server.stop(grace=None).wait(5.0)
        self._executor.shutdown(wait=False)


def bare_host_burst(service_url: str, cmdline: list[str], pins: list[Pin], warm_up: Pin) -> dict[str, float]:
    """A fresh ``BareHost`` driving ``cmdline``: its first answer, then one burst.

    Returns cold_first_seconds, seconds (of the burst) and the host's and
    plugin's CPU per check in the burst.
    """
    host = BareHost(service_url, cmdline)

    def burst() -> int:
        host.check_all(pins)
        return 0  # it counts answers only: a lost one raises TimeoutError

    try:
        cold = host.cold_first_seconds(warm_up)
        figures = measure_burst(burst, [psutil.Process(host.plugin.pid)], len(pins))
    finally:
        host.close()
    return figures | {"cold_first_seconds": cold}
