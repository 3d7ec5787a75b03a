"""Baseline (a): the admission messages over bare grpcio, with no library logic.

The host side lives here, in the benchmark's process: a gRPC server on
127.0.0.1 whose ListAdmissions handler is a generator fed by a queue, and
whose ResolveAdmission handler counts answers. The plugin side is
``benchmarks/plugins.py bare-peer`` in its own process. Per check, the same
messages cross the wire as with the library: one ``Admission`` on the
long-lived stream, one ``ResolveAdmissionRequest`` call back. What is left
out is everything the library adds: pins, promises, admission IDs derived by
hashing, tickets, the bounded queue, the SDK's handler plumbing.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf.empty_pb2 import Empty

from cipdplugin.pins import Pin
from cipdplugin.protocol import cipd_pb2, plugin_pb2

PEER = Path(__file__).resolve().parent / "plugins.py"
#: Bound on every wait, so that a broken peer fails the benchmark instead of hanging it.
WAIT_LIMIT = 300.0


class BareAdmissionServer:
    """One bare server and its peer process; used for one measurement, then closed.

    ``peer_workers`` is how the peer answers: 0 inline on the stream's
    thread, N from a pool of N threads.
    """

    def __init__(self, service_url: str, peer_workers: int) -> None:
        self._service_url = service_url
        self._outbox: queue.SimpleQueue[plugin_pb2.Admission | None] = queue.SimpleQueue()
        self._connected = threading.Event()
        # Guards the two fields below.
        self._lock = threading.Lock()
        self._remaining = 0  # answers still expected in the current burst
        self._answered = threading.Event()  # set when _remaining reaches 0
        # A deliberate independent baseline: the handler table is written out
        # here rather than taken from cipdplugin.host.transport, so that the
        # floor it measures owes nothing to the code it is compared with.
        handler = grpc.method_handlers_generic_handler(
            "cipd.plugin.Admissions",
            {
                "ListAdmissions": grpc.unary_stream_rpc_method_handler(
                    self._list_admissions,
                    request_deserializer=plugin_pb2.ListAdmissionsRequest.FromString,
                    response_serializer=plugin_pb2.Admission.SerializeToString,
                ),
                "ResolveAdmission": grpc.unary_unary_rpc_method_handler(
                    self._resolve_admission,
                    request_deserializer=plugin_pb2.ResolveAdmissionRequest.FromString,
                    response_serializer=Empty.SerializeToString,
                ),
            },
        )
        self._executor = futures.ThreadPoolExecutor(64, thread_name_prefix="bare-server")
        self._server = grpc.server(self._executor, handlers=[handler], options=[("grpc.so_reuseport", 0)])
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.peer = subprocess.Popen(
            [sys.executable, str(PEER), "bare-peer", str(port), str(peer_workers)], stdin=subprocess.DEVNULL
        )
        self._next_id = 0

    def _list_admissions(self, request: plugin_pb2.ListAdmissionsRequest, context: Any) -> Iterator[Any]:
        self._connected.set()
        while True:
            admission = self._outbox.get()  # Cannot hang: close() sends None.
            if admission is None:
                return
            yield admission

    def _resolve_admission(self, request: plugin_pb2.ResolveAdmissionRequest, context: Any) -> Empty:
        with self._lock:
            self._remaining -= 1
            if self._remaining == 0:
                self._answered.set()
        return Empty()

    def check_all(self, pins: list[Pin]) -> None:
        """Send one Admission per pin and return once every one is answered.

        Raises:
            TimeoutError: the peer did not answer within ``WAIT_LIMIT``.
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
                    instance=cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA1, hex_digest=pin.instance_id),
                )
            )
        if not self._answered.wait(WAIT_LIMIT):
            raise TimeoutError(f"the bare peer answered {len(pins) - self._remaining} of {len(pins)}")

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
