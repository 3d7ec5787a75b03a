"""The plugin-side SDK: the generic entry point every plugin kind builds on.

A plugin is started by its host with one line of JSON on stdin,
``{"port": <int>, "ticket": "<string>"}``. It connects to the host's gRPC
server on 127.0.0.1 at that port and sends the ticket with every call. The
host closes the plugin's stdin to ask it to stop; that also happens when the
host process dies.

This package never imports the host side.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import grpc

from cipdplugin.constants import SDK_STOP_GRACE
from cipdplugin.deadline import Deadline
from cipdplugin.plugins.logs import HostLogHandler
from cipdplugin.protocol import TICKET_METADATA_KEY

#: A handshake line longer than this is rejected.
MAX_HANDSHAKE_BYTES = 64 * 1024

RunLoop = Callable[[grpc.Channel, threading.Event], "int | None"]
#: Call metadata: (key, value) pairs, as grpc takes them.
CallMetadata = tuple[tuple[str, str], ...]
ConnectedRunLoop = Callable[["Connection", threading.Event], "int | None"]


class HandshakeError(ValueError):
    """The host's handshake line is missing or malformed."""


@dataclass(frozen=True)
class Handshake:
    port: int
    ticket: str


def parse_handshake(line: bytes | str) -> Handshake:
    """Parse the handshake line as JSON (never by bytes: the Go host may add spaces).

    Raises:
        HandshakeError: not JSON, not an object, or a bad ``port``/``ticket``.
    """
    try:
        data: Any = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: deeply nested arrays fit well within the line limit.
        raise HandshakeError(f"the handshake is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HandshakeError(f"the handshake must be a JSON object, got {type(data).__name__}")
    port, ticket = data.get("port"), data.get("ticket")
    # protojson may quote integers; accept both spellings. ASCII digits only,
    # and few of them: int() rejects "²" and 5000-digit strings with ValueError.
    if isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5:
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise HandshakeError(f"the handshake has no valid 'port' (1-65535): {port!r}")
    # gRPC refuses metadata values outside printable ASCII, and only at the first call.
    if not isinstance(ticket, str) or not ticket or not (ticket.isascii() and ticket.isprintable()):
        raise HandshakeError("the handshake has no valid 'ticket' (a non-empty string of printable ASCII)")
    return Handshake(port=port, ticket=ticket)


def read_handshake(stdin: BinaryIO) -> Handshake:
    """Read the handshake line from ``stdin``, one byte at a time.

    Byte by byte, so that nothing after the line is consumed.

    Raises:
        HandshakeError: end of input before a newline, an overlong line, or
            a malformed one (see ``parse_handshake``).
    """
    read = _byte_reader(stdin)
    line = bytearray()
    while True:
        byte = read(1)
        if not byte:
            raise HandshakeError("stdin ended before the handshake line (is this run by a CIPD host?)")
        if byte == b"\n":
            return parse_handshake(bytes(line))
        line += byte
        if len(line) > MAX_HANDSHAKE_BYTES:
            raise HandshakeError(f"the handshake line is longer than {MAX_HANDSHAKE_BYTES} bytes")


def _byte_reader(stdin: BinaryIO) -> Callable[[int], bytes]:
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return stdin.read
    return lambda size: os.read(fd, size)


class _TicketInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the plugin's ticket to the metadata of every call."""

    def __init__(self, metadata: CallMetadata) -> None:
        self._metadata = metadata

    def _with_ticket(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_ticket(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_ticket(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_ticket(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_ticket(details), requests)


@dataclass(frozen=True)
class Connection:
    """A plugin's connection to its host, for plugin kinds built on ``serve``.

    ``channel`` adds nothing to the calls made on it: each call passes
    ``metadata`` (the ticket) itself, which costs less per call than an
    interceptor. Closing the channel ends every call.
    """

    channel: grpc.Channel
    metadata: CallMetadata

    def ticketed_channel(self) -> grpc.Channel:
        """The same channel, adding the ticket to every call (what ``run`` hands over)."""
        return grpc.intercept_channel(self.channel, _TicketInterceptor(self.metadata))


def ticket_metadata(handshake: Handshake) -> CallMetadata:
    """The metadata every call to the host must carry: the plugin's ticket."""
    return ((TICKET_METADATA_KEY, handshake.ticket),)


def open_channel(handshake: Handshake, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to the host, without the ticket (see ``Connection``)."""
    # Never through a proxy: the host is on loopback.
    return grpc.insecure_channel(
        f"127.0.0.1:{handshake.port}", options=[("grpc.enable_http_proxy", 0), *options]
    )


def connect(handshake: Handshake) -> tuple[grpc.Channel, grpc.Channel]:
    """Open a channel to the host; return (the ticketed channel, the raw one).

    Close the raw one to end every call.
    """
    connection = Connection(open_channel(handshake), ticket_metadata(handshake))
    return connection.ticketed_channel(), connection.channel


def run(run_loop: RunLoop, *, stdin: BinaryIO | None = None) -> int:
    """Run a plugin: read the handshake, connect, call ``run_loop(channel, stopping)``.

    ``channel`` carries the ticket on every call. ``stopping`` is set once
    the host closes stdin (or dies); ``run`` then gives ``run_loop`` and the
    log flush half a second in all (``SDK_STOP_GRACE``) and returns
    regardless, so a stuck handler cannot keep the plugin alive. Standard
    ``logging`` records reach the host's log through the Log RPC while
    ``run`` runs.

    Returns the exit code: ``run_loop``'s result (None means 0), 1 if it
    raised, 2 for a bad handshake.
    """

    def connected_loop(connection: Connection, stopping: threading.Event) -> int | None:
        return run_loop(connection.ticketed_channel(), stopping)

    return serve(connected_loop, stdin=stdin)


def serve(
    run_loop: ConnectedRunLoop,
    *,
    stdin: BinaryIO | None = None,
    channel_options: Sequence[tuple[str, Any]] = (),
) -> int:
    """``run``, for plugin kinds that pass the ticket themselves: ``run_loop``
    gets the ``Connection`` (the channel opened with ``channel_options``)."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    program = os.path.basename(sys.argv[0]) or "plugin"
    try:
        handshake = read_handshake(stdin)
    except HandshakeError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 2

    connection = Connection(open_channel(handshake, channel_options), ticket_metadata(handshake))
    stopping = threading.Event()
    finished = threading.Event()
    outcome: list[int] = []

    def watch_stdin() -> None:
        read = _byte_reader(stdin)
        try:
            while read(4096):
                pass  # The host sends nothing after the handshake.
        except (OSError, ValueError):
            pass
        stopping.set()
        finished.set()

    def loop() -> None:
        try:
            code = run_loop(connection, stopping)
            outcome.append(0 if code is None else code)
        except Exception:
            logging.getLogger(__name__).error("the plugin's run loop failed:\n%s", traceback.format_exc())
            traceback.print_exc()
            outcome.append(1)
        finally:
            finished.set()

    log_handler = HostLogHandler(connection.channel, metadata=connection.metadata)
    log_handler.install()
    # Both threads are daemons: a handler stuck in user code must not keep
    # the process alive once the host has said stop.
    threading.Thread(target=watch_stdin, name="cipdplugin-stdin", daemon=True).start()
    loop_thread = threading.Thread(target=loop, name="cipdplugin-run-loop", daemon=True)
    loop_thread.start()
    stop_deadline = Deadline(None)
    try:
        # Cannot hang: stdin reaches EOF when the host closes it or dies.
        finished.wait()
        stop_deadline = Deadline(SDK_STOP_GRACE)
        if not outcome:
            stopping.set()
            loop_thread.join(stop_deadline.remaining())
    finally:
        log_handler.uninstall(timeout=stop_deadline.remaining_or(SDK_STOP_GRACE))
        connection.channel.close()
    return outcome[0] if outcome else 0


__all__ = [
    "CallMetadata",
    "Connection",
    "Handshake",
    "HandshakeError",
    "connect",
    "open_channel",
    "parse_handshake",
    "read_handshake",
    "run",
    "serve",
    "ticket_metadata",
]
