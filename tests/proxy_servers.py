"""An HTTP proxy on 127.0.0.1 for the tests: CONNECT tunnels and forwarded requests.

``HttpProxy(upstreams)`` resolves names itself (``upstreams`` maps
``"backend.test:443"`` to a loopback address), so tests can name backends
that no resolver knows and that are not loopback (loopback is never
proxied). It records each request it was sent (``seen``) and every byte a
client sent into its tunnels (``tunneled``), and can demand credentials.
"""

from __future__ import annotations

import base64
import select
import socket
from dataclasses import dataclass

from tests.loopback_server import LoopbackServer


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it."""

    method: str
    target: str
    headers: dict[str, str]


class HttpProxy(LoopbackServer):
    """The proxy; ``close()`` stops it and ends every connection."""

    name = "proxy"

    def __init__(
        self, upstreams: dict[str, tuple[str, int]], *, credentials: tuple[str, str] | None = None
    ) -> None:
        self.upstreams = upstreams
        self.expected = None
        if credentials is not None:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            self.expected = f"Basic {token}"
        # Guarded by the base's _lock, which connection threads and the test share.
        self._seen: list[Seen] = []
        self._tunneled = bytearray()
        super().__init__()

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @property
    def tunneled(self) -> bytes:
        with self._lock:
            return bytes(self._tunneled)

    def __enter__(self) -> HttpProxy:
        return self

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(10)
        upstream: socket.socket | None = None
        try:
            method, target, headers, rest = _read_head(client)
            request = Seen(method, target, headers)
            with self._lock:
                self._seen.append(request)
            if self.expected is not None and headers.get("proxy-authorization") != self.expected:
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return
            authority = target if method == "CONNECT" else target.removeprefix("http://").partition("/")[0]
            address = self.upstreams.get(authority)
            if address is None:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            upstream = socket.create_connection(address, timeout=10)
            with self._lock:
                self._connections.add(upstream)  # close() shuts it too
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self._relay(client, upstream, rest)
            else:
                self._forward(client, upstream, request, rest)
        except (OSError, ValueError):
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()
                with self._lock:
                    self._connections.discard(upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket, early: bytes) -> None:
        """Copy bytes both ways until either side closes."""
        if early:
            with self._lock:
                self._tunneled += early
            upstream.sendall(early)
        while not self.stopping.is_set():
            readable, _, _ = select.select([client, upstream], [], [], 0.1)
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                if sock is client:
                    with self._lock:
                        self._tunneled += data
                    upstream.sendall(data)
                else:
                    client.sendall(data)

    def _forward(self, client: socket.socket, upstream: socket.socket, request: Seen, body: bytes) -> None:
        """Send one request on as a server expects it, and its answer back; then close."""
        method, target, headers = request.method, request.target, request.headers
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            data = client.recv(65536)
            if not data:
                return
            body += data
        path = "/" + target.removeprefix("http://").partition("/")[2]
        lines = [f"{method} {path} HTTP/1.1"]
        lines += [
            f"{name.title()}: {value}" for name, value in headers.items() if name != "proxy-authorization"
        ]
        lines.append("Connection: close")
        upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        while True:
            data = upstream.recv(65536)
            if not data:
                return
            client.sendall(data)


def _read_head(sock: socket.socket) -> tuple[str, str, dict[str, str], bytes]:
    """A request's line and fields, and the bytes received after them."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ValueError("the client left before its request ended")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    method, target, _ = line.split(" ", 2)
    headers: dict[str, str] = {}
    for field in fields:
        name, _, value = field.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers, rest
