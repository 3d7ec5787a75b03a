"""Hostile plugins: raw gRPC clients, not our SDK, that misbehave by mode.

Usage: hostile.py MODE [RESULT_FILE [ARG...]]. Each reads the handshake from
stdin itself, connects with a plain channel, and adds (or withholds) the
ticket by hand. Modes that report write one JSON object to RESULT_FILE
(atomically, so a test can poll for the file) mapping each probe to the
status code name it got. Afterwards every mode but the crashing ones keeps
its stream open, admits what it is sent, and exits when stdin reaches EOF.

* ``crash-after-handshake``: reads the handshake, then exits 5 without
  calling ListAdmissions.
* ``malformed``: sends one malformed request to every method, then admits
  what it is sent (no result file).
* ``crash-on-close``: opens the stream, never resolves anything, and exits
  9 as soon as stdin closes (a plugin that crashes while the host closes).
* ``probe RESULT_FILE``: every method without a ticket, with a
  wrong one and with a forged one of the right shape; malformed and
  oversized messages to every method; ListMetadata for another service
  URL; ResolveAdmission for an unknown ID; then the real stream, a second
  ListAdmissions, and the resolution of its first admission.
* ``wrong-version RESULT_FILE``: ListAdmissions with protocol version 2,
  then a Log call with the same ticket.
* ``attack RESULT_FILE COUNT``: a denial of service from a local process
  that has no ticket: opens COUNT ResolveAdmission calls without one that
  never send their request, waits up to 3 s for them to end, and reports
  how many ended with each code and how many were still open.
* ``hold RESULT_FILE COUNT``: a plugin with its own valid ticket opens
  COUNT Log calls that never send their request, waits up to 3 s, and
  reports how many ended with each code and how many are still open; it
  keeps them open until stdin closes.
* ``metadata-deadline RESULT_FILE SECONDS SERVICE_URL``: one ListMetadata
  call with its ticket and a deadline of SECONDS; reports the code, the
  details and how long the answer took.
* ``stall COUNT``: opens its stream, admits the first COUNT admissions,
  then stops reading the stream (keeping it open) until stdin closes.
* ``refused-until-eof RESULT_FILE``: asks for protocol version 2 in the
  background and, the instant stdin closes, reports the answer it has by
  then ("NONE" if none) and exits: a plugin that leaves on EOF at once.
* ``forge RESULT_FILE SERVICE_URL PIN...``: opens its stream, then sends
  ResolveAdmission denials for the IDs the pins would have on this host
  (the public derivation rule, salted with the host's pid, which is this
  process's parent).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cipdplugin.host.checks import admission_id
from cipdplugin.pins import Pin
from cipdplugin.plugins import Handshake, read_handshake
from cipdplugin.protocol import (
    ADMISSIONS_LIST,
    ADMISSIONS_RESOLVE,
    HOST_LIST_METADATA,
    HOST_LOG,
    TICKET_METADATA_KEY,
    plugin_pb2,
)

#: Bytes that no message of the protocol parses: a length-delimited field
#: cut short, an invalid wire type, and a varint longer than ten bytes.
MALFORMED = {"truncated": b"\x0a\x05ab", "bad-wire-type": b"\x07", "overlong-varint": b"\xff" * 11}
#: Over gRPC's default 4 MiB limit on received messages.
OVERSIZED = b"\xff" * (5 * 1024 * 1024)
METHODS = (HOST_LOG, HOST_LIST_METADATA, ADMISSIONS_LIST, ADMISSIONS_RESOLVE)
_STREAMING = {ADMISSIONS_LIST}
_RPC_TIMEOUT = 10.0

Metadata = tuple[tuple[str, str], ...]


def _identity(data: bytes) -> bytes:
    return data


class RawClient:
    """Calls any method with any bytes and any metadata; returns the status code's name."""

    def __init__(self, handshake: Handshake) -> None:
        self.ticket = handshake.ticket
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{handshake.port}", options=[("grpc.enable_http_proxy", 0)]
        )

    def ticketed(self, ticket: str | None = None) -> Metadata:
        return ((TICKET_METADATA_KEY, ticket if ticket is not None else self.ticket),)

    def call(self, method: str, payload: bytes, metadata: Metadata = ()) -> str:
        try:
            if method in _STREAMING:
                stream = self.channel.unary_stream(
                    method, request_serializer=_identity, response_deserializer=_identity
                )
                responses = stream(payload, metadata=metadata, timeout=_RPC_TIMEOUT)
                # Every probe expects an error here; a call that wrongly
                # succeeds returns its first admission, or times out.
                next(iter(responses), None)
            else:
                unary = self.channel.unary_unary(
                    method, request_serializer=_identity, response_deserializer=_identity
                )
                unary(payload, metadata=metadata, timeout=_RPC_TIMEOUT)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return "OK"

    def admissions(self, protocol_version: int = 1) -> Iterator[plugin_pb2.Admission]:
        stream = self.channel.unary_stream(
            ADMISSIONS_LIST,
            request_serializer=plugin_pb2.ListAdmissionsRequest.SerializeToString,
            response_deserializer=plugin_pb2.Admission.FromString,
        )
        request = plugin_pb2.ListAdmissionsRequest(
            protocol_version=protocol_version, plugin_version="hostile"
        )
        return iter(stream(request, metadata=self.ticketed()))

    def resolve(self, admission_id: str, denied: str | None = None) -> str:
        request = plugin_pb2.ResolveAdmissionRequest(admission_id=admission_id)
        if denied is not None:
            request.status.code = grpc.StatusCode.FAILED_PRECONDITION.value[0]
            request.status.message = denied
        return self.call(ADMISSIONS_RESOLVE, request.SerializeToString(), self.ticketed())


def write_result(path: str, result: dict[str, Any]) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(result, file)
    os.replace(temporary, path)


def exit_on_eof(code: int = 0) -> None:
    """Exit the whole process with ``code`` once stdin reaches EOF (the host's stop)."""

    def watch() -> None:
        while os.read(0, 4096):
            pass
        os._exit(code)

    threading.Thread(target=watch, daemon=True).start()


def admit_forever(client: RawClient, stream: Iterator[plugin_pb2.Admission]) -> None:
    """Behave from now on: admit everything until the stream ends."""
    try:
        for admission in stream:
            client.resolve(admission.admission_id)
    except grpc.RpcError:
        pass


def probe(client: RawClient) -> tuple[dict[str, Any], Iterator[plugin_pb2.Admission]]:
    results: dict[str, Any] = {}
    forged_ticket = base64.b64encode(secrets.token_bytes(64)).decode("ascii").rstrip("=")
    empty = b""
    for method in METHODS:
        name = method.rsplit("/", 1)[1]
        results[f"{name} no-ticket"] = client.call(method, empty)
        results[f"{name} wrong-ticket"] = client.call(method, empty, client.ticketed("wrong"))
        results[f"{name} forged-ticket"] = client.call(method, empty, client.ticketed(forged_ticket))
        for kind, payload in MALFORMED.items():
            results[f"{name} {kind}"] = client.call(method, payload, client.ticketed())
        results[f"{name} oversized"] = client.call(method, OVERSIZED, client.ticketed())

    other_service = plugin_pb2.ListMetadataRequest(service_url="https://evil.example.com", package="a")
    results["ListMetadata other-service"] = client.call(
        HOST_LIST_METADATA, other_service.SerializeToString(), client.ticketed()
    )
    results["ResolveAdmission unknown-id"] = client.resolve("bm90IGFuIGFkbWlzc2lvbg")
    log = plugin_pb2.LogRequest(severity="info", message="the hostile plugin is still welcome")
    results["Log after-garbage"] = client.call(HOST_LOG, log.SerializeToString(), client.ticketed())

    stream = client.admissions()
    first = next(stream)
    results["ListAdmissions second"] = client.call(
        ADMISSIONS_LIST,
        plugin_pb2.ListAdmissionsRequest(protocol_version=1).SerializeToString(),
        client.ticketed(),
    )
    results["ResolveAdmission own"] = client.resolve(first.admission_id)
    results["first-package"] = first.package
    return results, stream


async def attack(port: int, count: int, result_file: str, *, ticket: str | None = None) -> None:
    """Open ``count`` calls that never send their request; report how they end.

    Without ``ticket``: ResolveAdmission calls without one. With it: Log
    calls carrying it, which the host must charge to this plugin's budget.
    """
    silence = asyncio.Event()

    async def nothing() -> AsyncIterator[bytes]:
        await silence.wait()  # Never set: the request never comes.
        yield b""

    options = [("grpc.enable_http_proxy", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        method = channel.stream_unary(
            ADMISSIONS_RESOLVE if ticket is None else HOST_LOG,
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        metadata = None if ticket is None else ((TICKET_METADATA_KEY, ticket),)
        calls = [method(nothing(), timeout=120, metadata=metadata) for _ in range(count)]
        codes = [asyncio.ensure_future(call.code()) for call in calls]
        finished, open_calls = await asyncio.wait(codes, timeout=3.0)
        counts = collections.Counter(str(code.result().name) for code in finished)
        write_result(result_file, {"codes": dict(counts), "open": len(open_calls)})
        # Keep the open ones open until the host stops this process.
        await asyncio.get_running_loop().run_in_executor(None, _read_until_eof)


def _read_until_eof() -> None:
    while os.read(0, 4096):
        pass


def refused_until_eof(client: RawClient, result_file: str) -> None:
    answer = ["NONE"]

    def ask() -> None:
        answer[0] = _first_code(client.admissions(protocol_version=2))

    threading.Thread(target=ask, daemon=True).start()
    _read_until_eof()
    write_result(result_file, {"answer at EOF": answer[0]})
    os._exit(0)


def main(argv: list[str]) -> int:
    mode, args = argv[1], argv[2:]
    handshake = read_handshake(sys.stdin.buffer)
    if mode == "crash-after-handshake":
        return 5
    if mode == "attack":
        asyncio.run(attack(handshake.port, int(args[1]), args[0]))
        return 0
    if mode == "hold":
        asyncio.run(attack(handshake.port, int(args[1]), args[0], ticket=handshake.ticket))
        return 0
    client = RawClient(handshake)
    if mode == "crash-on-close":
        exit_on_eof(9)
        for _ in client.admissions():
            pass  # Never resolved: the checks stay pending until the host closes.
        return 0
    if mode == "metadata-deadline":
        seconds, service_url = float(args[1]), args[2]
        request = plugin_pb2.ListMetadataRequest(service_url=service_url, package="ok/tool")
        call = client.channel.unary_unary(
            HOST_LIST_METADATA,
            request_serializer=plugin_pb2.ListMetadataRequest.SerializeToString,
            response_deserializer=plugin_pb2.ListMetadataResponse.FromString,
        )
        started = time.monotonic()
        try:
            call(request, metadata=client.ticketed(), timeout=seconds)
            code, details = "OK", ""
        except grpc.RpcError as exc:
            code, details = str(exc.code().name), str(exc.details())
        write_result(args[0], {"code": code, "details": details, "seconds": time.monotonic() - started})
        exit_on_eof()
        threading.Event().wait()
        return 0
    if mode == "stall":
        exit_on_eof()
        stream = client.admissions()
        for _ in range(int(args[0])):
            client.resolve(next(stream).admission_id)
        threading.Event().wait()  # Never reads again: only stdin's end stops this.
        return 0
    if mode == "malformed":
        exit_on_eof()
        for method in METHODS:
            client.call(method, MALFORMED["truncated"], client.ticketed())
        admit_forever(client, client.admissions())
        return 0
    result_file = args[0]
    # Results are written before watching stdin: the host may close it early
    # (as it does on a wrong protocol version), and they must still be seen.
    if mode == "probe":
        results, stream = probe(client)
        write_result(result_file, results)
        exit_on_eof()
        admit_forever(client, stream)
    elif mode == "wrong-version":
        results = {"ListAdmissions version-2": _first_code(client.admissions(protocol_version=2))}
        log = plugin_pb2.LogRequest(severity="info", message="still here?")
        results["Log after"] = client.call(HOST_LOG, log.SerializeToString(), client.ticketed())
        write_result(result_file, results)
        exit_on_eof()
    elif mode == "refused-until-eof":
        refused_until_eof(client, result_file)
    elif mode == "forge":
        service_url, pins = args[1], [Pin.parse(text) for text in args[2:]]
        stream = client.admissions()
        salt = str(os.getppid()).encode()
        results = {}
        for pin in pins:
            forged = plugin_pb2.Admission(
                service_url=service_url, package=pin.package, instance=pin.object_ref
            )
            results[str(pin)] = client.resolve(
                admission_id(forged, salt), denied="forged by a hostile plugin"
            )
        write_result(result_file, results)
        exit_on_eof()
        admit_forever(client, stream)
    else:
        print(f"hostile.py: unknown mode {mode!r}", file=sys.stderr)
        return 2
    threading.Event().wait()  # Until stdin closes and exit_on_eof ends the process.
    return 0


def _first_code(stream: Iterator[plugin_pb2.Admission]) -> str:
    try:
        next(stream, None)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
