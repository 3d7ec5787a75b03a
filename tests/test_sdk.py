"""The plugin SDK layer: the handshake parser (fuzzed), bad handshakes, and the
SDK under a host that behaves like the Go client."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cipdplugin import Pin
from cipdplugin.host.checks import admission_id
from cipdplugin.plugins import MAX_HANDSHAKE_BYTES, Handshake, HandshakeError, parse_handshake
from cipdplugin.protocol import TICKET_METADATA_KEY, plugin_pb2
from tests.conftest import SERVICE_URL, hex_id, plugin_cmd
from tests.go_anchors import run_driver
from tests.plain_grpc import protocol_handlers, stream_from

#: JSON values of every type, for the fields of a handshake object.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)
port_values = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=0, max_value=70000).map(str)
    | st.text(max_size=8)
    | json_values
)
ticket_values = st.text(max_size=100) | json_values


def check_parse(line: bytes | str) -> None:
    """The parser's contract: a valid Handshake, or HandshakeError; nothing else."""
    try:
        handshake = parse_handshake(line)
    except HandshakeError as exc:
        assert str(exc)
        return
    assert isinstance(handshake, Handshake)
    assert type(handshake.port) is int
    assert 0 < handshake.port < 65536
    assert isinstance(handshake.ticket, str)
    assert handshake.ticket
    # Anything else, gRPC would refuse as a metadata value at the first call.
    assert all(" " <= char <= "~" for char in handshake.ticket)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
@example(b"")
@example(b"\xff\xfe{")
@example(b"[" * 60_000)
@example(b'{"port": 1, "ticket": "t"' + b"}" * 3)
def test_parse_handshake_arbitrary_bytes(line: bytes) -> None:
    check_parse(line)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
@example("NaN")
@example('{"port": NaN, "ticket": "t"}')
@example('{"port": Infinity, "ticket": "t"}')
def test_parse_handshake_arbitrary_text(line: str) -> None:
    check_parse(line)


@settings(max_examples=600, deadline=None)
@given(
    st.fixed_dictionaries({}, optional={"port": port_values, "ticket": ticket_values})
    | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    st.booleans(),
)
@example({"port": "²", "ticket": "t"}, False)
@example({"port": "9" * 5000, "ticket": "t"}, False)
@example({"port": True, "ticket": "t"}, True)
@example({"port": 1.0, "ticket": "t"}, False)
@example({"port": 65536, "ticket": "t"}, False)
@example({"port": "443", "ticket": "t"}, True)
def test_parse_handshake_json_objects(data: dict[str, Any], spaced: bool) -> None:
    # The Go host writes protojson, which may put spaces after separators.
    separators = (", ", ": ") if spaced else (",", ":")
    line = json.dumps(data, separators=separators, allow_nan=True)
    check_parse(line)
    check_parse(line.encode("utf-8"))


def test_parse_handshake_accepts_both_spellings() -> None:
    assert parse_handshake('{"port":443,"ticket":"abc"}') == Handshake(443, "abc")
    assert parse_handshake(b'{"port": "443", "ticket": "abc"}') == Handshake(443, "abc")
    assert parse_handshake('{"ticket":"abc","port":1,"extra":[1,2]}') == Handshake(1, "abc")


def run_plugin_with_stdin(data: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run the SDK test plugin with ``data`` as its whole standard input."""
    return subprocess.run(plugin_cmd("admit"), input=data, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        pytest.param(b"hello there\n", "the handshake is not JSON", id="not-json"),
        pytest.param(b"", "stdin ended before the handshake line", id="empty"),
        pytest.param(
            b'{"port":1234,"ticket":"abc"}', "stdin ended before the handshake line", id="no-newline"
        ),
        pytest.param(b"[1, 2]\n", "must be a JSON object, got list", id="not-an-object"),
        pytest.param(b'{"port":"x","ticket":"abc"}\n', "no valid 'port'", id="port-string"),
        pytest.param(b'{"port":1234,"ticket":7}\n', "no valid 'ticket'", id="ticket-number"),
        pytest.param(b'{"port":1234,"ticket":""}\n', "no valid 'ticket'", id="ticket-empty"),
        pytest.param(b'{"port":1234,"ticket":"caf\\u00e9"}\n', "no valid 'ticket'", id="ticket-not-ascii"),
        pytest.param(b'{"port":1234,"ticket":"a\\nb"}\n', "no valid 'ticket'", id="ticket-control-char"),
        pytest.param(
            b'{"port":70000,"ticket":"abc"}\n', "no valid 'port' (1-65535): 70000", id="port-too-big"
        ),
        pytest.param(b'{"port":0,"ticket":"abc"}\n', "no valid 'port'", id="port-zero"),
        pytest.param(b'{"port":"\xc2\xb2","ticket":"abc"}\n', "no valid 'port'", id="port-superscript"),
        pytest.param(b"[" * 60_000 + b"\n", "the handshake is not JSON", id="deeply-nested"),
        pytest.param(
            b"x" * (MAX_HANDSHAKE_BYTES + 10),
            f"longer than {MAX_HANDSHAKE_BYTES} bytes",
            id="huge-line",
        ),
    ],
)
def test_plugin_rejects_bad_handshake(stdin: bytes, message: str) -> None:
    result = run_plugin_with_stdin(stdin)
    stderr = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == 2, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    # One line, naming the program, is all a user should need.
    assert stderr.strip().count("\n") == 0
    assert stderr.startswith("admission_plugin.py: ")


# -- Under a Go host -----------------------------------------------------------------
#
# The real Go host (go-host-driver, from ../shared/anchors/bin) checks what it
# can show: verdicts, denial messages, error codes, the plugin's version
# string, protocol version 1 (it refuses any other) and the ticket (it refuses
# calls without the right one). tests/test_go_interop.py has the rest.


@pytest.mark.usefixtures("go_binaries")
def test_sdk_plugin_speaks_the_protocol_to_the_go_host() -> None:
    # Every 3rd pin is under error/ (PERMISSION_DENIED "no access"), then deny/.
    failed = run_driver(plugin_cmd("admit"), "-n", "6", "-deny-every", "3", "-deny-prefix", "error/pkg/")
    denied = run_driver(
        plugin_cmd("admit"), "-n", "6", "-deny-every", "3", "-deny-prefix", "deny/pkg/", "-log-level", "debug"
    )
    assert (failed["admitted"], failed["denied"], failed["errors"]) == (4, 0, 2)
    assert "error verdict: rpc error: code = PermissionDenied desc = no access" in failed.stderr
    assert (denied["admitted"], denied["denied"], denied["errors"]) == (4, 2, 0)
    assert denied["denied_messages"] == ["deny/pkg/2 is denied", "deny/pkg/5 is denied"]
    assert 'Using deployment admission plugin "test-plugin 1.0"' in denied.stderr


# -- Under a stand-in for the Go host --------------------------------------------------
#
# What the Go host cannot be made to show is checked against this stand-in:
# the bytes of an admitted answer (the Go host reads "no status" and "status
# OK" alike), the ticket on each call (it reports no ticket it accepted), and
# a server that stops without the plugin's stdin closing (the Go host's
# Close always closes stdin right after stopping its server).

TICKET = "go-style-ticket"


class GoLikeHost:
    """A bare Admissions server that records every call and its ticket.

    A deliberate independent baseline: its handler table is written out here,
    not taken from cipdplugin.host.transport, so that the SDK is checked
    against the wire as the Go host speaks it, not against our own host.
    """

    def __init__(self) -> None:
        self.admissions: queue.Queue[plugin_pb2.Admission | None] = queue.Queue()
        self.list_requests: list[plugin_pb2.ListAdmissionsRequest] = []
        self.resolutions: queue.Queue[plugin_pb2.ResolveAdmissionRequest] = queue.Queue()
        self.tickets: list[str | None] = []
        self.executor = futures.ThreadPoolExecutor(4)
        self.server = grpc.server(self.executor, options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers(
            protocol_handlers(list_admissions=self._list, resolve_admission=self._resolve)
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
        yield from stream_from(self.admissions, context)

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


def test_sdk_plugin_answers_a_go_like_host_with_the_go_sdks_bytes(go_host: GoLikeHost) -> None:
    plugin = start_plugin("admit", go_host.port)
    try:
        admitted = go_host.ask(Pin("a/b", hex_id(1)))
        denied = go_host.ask(Pin("deny/b", hex_id(2)))
    finally:
        assert plugin.stdin is not None
        plugin.stdin.close()
        plugin.wait(10)
    # Admitted: no status at all, as the Go SDK sends it.
    assert not admitted.HasField("status")
    assert denied.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    # The ticket rode on every call: the stream and both answers.
    assert go_host.tickets == [TICKET] * 3
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
