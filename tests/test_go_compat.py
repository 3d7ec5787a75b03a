"""Our plugin SDK under a host that behaves like the Go CIPD client.

The Go host differs from ours in ways a plugin must tolerate: it writes the
handshake as protojson (which may put a space after the comma), and when it
closes it may simply stop its server, so the plugin sees UNAVAILABLE rather
than ABORTED. This module plays such a host with raw gRPC, written from the
protocol description, and checks what goes over the wire.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from cipdplugin import Pin
from cipdplugin.host.admission import admission_id
from cipdplugin.protocol import TICKET_METADATA_KEY, plugin_pb2
from tests.conftest import SERVICE_URL, hex_id, plugin_cmd

TICKET = "go-style-ticket"


class GoLikeHost:
    """A bare Admissions server that records every call and its ticket."""

    def __init__(self) -> None:
        self.admissions: queue.Queue[plugin_pb2.Admission | None] = queue.Queue()
        self.list_requests: list[plugin_pb2.ListAdmissionsRequest] = []
        self.resolutions: queue.Queue[plugin_pb2.ResolveAdmissionRequest] = queue.Queue()
        self.tickets: list[str | None] = []
        self.executor = futures.ThreadPoolExecutor(4)
        self.server = grpc.server(self.executor, options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "cipd.plugin.Admissions",
                    {
                        "ListAdmissions": grpc.unary_stream_rpc_method_handler(
                            self._list,
                            request_deserializer=plugin_pb2.ListAdmissionsRequest.FromString,
                            response_serializer=plugin_pb2.Admission.SerializeToString,
                        ),
                        "ResolveAdmission": grpc.unary_unary_rpc_method_handler(
                            self._resolve,
                            request_deserializer=plugin_pb2.ResolveAdmissionRequest.FromString,
                            response_serializer=Empty.SerializeToString,
                        ),
                    },
                )
            ]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _ticket(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        value = metadata.get(TICKET_METADATA_KEY)
        self.tickets.append(value if isinstance(value, str) else None)

    def _list(
        self, request: plugin_pb2.ListAdmissionsRequest, context: grpc.ServicerContext
    ) -> Iterator[plugin_pb2.Admission]:
        self._ticket(context)
        self.list_requests.append(request)
        while context.is_active():
            try:
                admission = self.admissions.get(timeout=0.1)
            except queue.Empty:
                continue
            if admission is None:
                return
            yield admission

    def _resolve(self, request: plugin_pb2.ResolveAdmissionRequest, context: grpc.ServicerContext) -> Empty:
        self._ticket(context)
        self.resolutions.put(request)
        return Empty()

    def ask(self, pin: Pin) -> plugin_pb2.ResolveAdmissionRequest:
        admission = plugin_pb2.Admission(
            service_url=SERVICE_URL, package=pin.package, instance=pin.object_ref
        )
        admission.admission_id = admission_id(admission, b"4242")
        self.admissions.put(admission)
        resolution = self.resolutions.get(timeout=30)
        assert resolution.admission_id == admission.admission_id
        return resolution

    def stop(self) -> None:
        self.admissions.put(None)
        self.server.stop(None).wait(5)
        self.executor.shutdown(wait=True)


@pytest.fixture
def go_host() -> Iterator[GoLikeHost]:
    host = GoLikeHost()
    yield host
    host.stop()


def start_plugin(mode: str, port: int) -> subprocess.Popen[bytes]:
    plugin = subprocess.Popen(plugin_cmd(mode), stdin=subprocess.PIPE)
    assert plugin.stdin is not None
    # protojson spacing, as the Go host may write it.
    plugin.stdin.write(f'{{"port": {port}, "ticket": "{TICKET}"}}\n'.encode())
    plugin.stdin.flush()
    return plugin


def test_sdk_plugin_speaks_the_protocol_to_a_go_like_host(go_host: GoLikeHost) -> None:
    plugin = start_plugin("admit", go_host.port)
    try:
        admitted = go_host.ask(Pin("a/b", hex_id(1)))
        denied = go_host.ask(Pin("deny/b", hex_id(2)))
        failed = go_host.ask(Pin("error/b", hex_id(3)))
    finally:
        assert plugin.stdin is not None
        plugin.stdin.close()
        plugin.wait(10)
    # Admitted: no status at all, as the Go SDK sends it.
    assert not admitted.HasField("status")
    assert (denied.status.code, denied.status.message) == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "deny/b is denied",
    )
    assert (failed.status.code, failed.status.message) == (
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        "no access",
    )
    assert go_host.list_requests[0].protocol_version == 1
    assert go_host.list_requests[0].plugin_version == "test-plugin 1.0"
    assert go_host.tickets and all(ticket == TICKET for ticket in go_host.tickets)
    assert plugin.returncode == 0


def test_sdk_plugin_stops_when_a_go_like_host_just_stops_its_server(go_host: GoLikeHost) -> None:
    plugin = start_plugin("admit", go_host.port)
    try:
        assert not go_host.ask(Pin("a/b", hex_id(1))).HasField("status")
        started = time.monotonic()
        # No ABORTED, no EOF on stdin: the stream just breaks (UNAVAILABLE).
        threading.Thread(target=go_host.server.stop, args=(None,)).start()
        assert plugin.wait(10) == 0
        assert time.monotonic() - started < 3.0
    finally:
        if plugin.poll() is None:
            plugin.kill()
            plugin.wait(5)
        assert plugin.stdin is not None
        plugin.stdin.close()
