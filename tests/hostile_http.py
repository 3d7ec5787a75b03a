"""A raw HTTP server on 127.0.0.1 that answers with a script: truncated, dripped, endless.

``HostileServer(script)`` accepts connections in a thread; for each request it
reads (request line, headers and a ``Content-Length`` body), it calls
``script(connection, number, stopping)``, where ``number`` counts requests
from 0 across connections. The script writes whatever it likes, and returns
True to keep the connection for another request. Scripts that wait must
wait on ``stopping`` so that ``close()`` ends them.
"""

from __future__ import annotations

import io
import socket
import threading
import zlib
from collections.abc import Callable

from cipdplugin import InstanceMetadata, ListMetadataResponse
from cipdplugin.backend import CODE_HEADER, PRPC_BINARY
from tests.loopback_server import LoopbackServer

#: (connection, request number, stopping) -> keep the connection open.
Script = Callable[[socket.socket, int, threading.Event], bool]


def answer_bytes(count: int = 3) -> bytes:
    """A real ListMetadataResponse with ``count`` entries, serialized."""
    entries = [InstanceMetadata(key=f"key{n}", value=f"value-{n}".encode() * 3) for n in range(count)]
    return ListMetadataResponse(metadata=entries).SerializeToString()


def head(length: int | None = None, *extra: str, status: str = "200 OK") -> bytes:
    """A pRPC OK head, with ``Content-Length`` when given."""
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {PRPC_BINARY}", f"{CODE_HEADER}: 0", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def gzip_bomb(decompressed: int) -> bytes:
    """A gzip stream of ``decompressed`` zero bytes, built without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(decompressed // len(block))]
    parts.append(compressor.flush())
    return b"".join(parts)


class HostileServer(LoopbackServer):
    """The server; ``close()`` stops it and ends every connection and script."""

    name = "hostile"

    def __init__(self, script: Script) -> None:
        self.script = script
        self._requests = 0  # guarded by the base's _lock
        super().__init__()

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def __enter__(self) -> HostileServer:
        return self

    def _serve(self, connection: socket.socket) -> None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.settimeout(10)
        reader = connection.makefile("rb")
        try:
            while not self.stopping.is_set():
                length = _read_request(reader)
                if length is None:
                    return
                reader.read(length)
                with self._lock:
                    number = self._requests
                    self._requests += 1
                if not self.script(connection, number, self.stopping):
                    return
        except OSError:
            return  # the client went away, or close() shut the connection
        finally:
            reader.close()
            connection.close()


def _read_request(reader: io.BufferedIOBase) -> int | None:
    """Read a request's head; its body length, or None at the end of the stream."""
    length = 0
    first = True
    while True:
        line = reader.readline(65536)
        if not line:
            return None
        if first:
            first = False
            continue
        if line in (b"\r\n", b"\n"):
            return length
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())


def drip(connection: socket.socket, data: bytes, interval: float, stopping: threading.Event) -> None:
    """Send ``data`` one byte every ``interval`` seconds, until done or stopping."""
    for index in range(len(data)):
        if stopping.wait(interval):
            return
        connection.sendall(data[index : index + 1])


def forever(connection: socket.socket, data: bytes, interval: float, stopping: threading.Event) -> None:
    """Send ``data`` every ``interval`` seconds until stopping (or the client leaves)."""
    while not stopping.wait(interval):
        connection.sendall(data)
