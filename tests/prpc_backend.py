"""A real pRPC CIPD backend for the tests: ``cipd.Repository/ListMetadata`` over
HTTP/1.1, in a thread, on 127.0.0.1 (plain or TLS) or on a unix socket.

It answers from a ``StaticRepository``, checks the ``Authorization`` header
when given a token, records what it was sent, and plays queued faults, one
per request, before answering normally again.
"""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipdplugin import AdmissionError, ListMetadataRequest, StaticRepository
from cipdplugin.backend import CODE_HEADER, PRPC_BINARY

# A body that claims a 5-byte field 1 but holds 3 bytes: it cannot decode.
GARBAGE_BODY = b"\x0a\x05abc"
HTML_503 = b"<html><head><title>503 Service Unavailable</title></head><body>Try later</body></html>"


@dataclass(frozen=True)
class Fault:
    """What to answer instead of the real answer, once.

    kind: ``code`` (a pRPC error: ``code`` and ``message``), ``html-503``,
    ``slow`` (answer normally after ``seconds``), ``garbage`` (code OK with a
    body that does not decode), ``no-code`` (HTTP ``status`` without a code
    header), ``close`` (close the connection without answering).
    """

    kind: str
    code: int = 0
    message: str = ""
    seconds: float = 0.0
    status: int = 200


@dataclass(frozen=True)
class Received:
    """One request as the backend saw it."""

    path: str
    headers: dict[str, str]
    request: ListMetadataRequest | None


@dataclass(frozen=True)
class TLSFiles:
    """A test CA and a server certificate it signed, for 127.0.0.1, localhost and backend.test.

    ``backend.test`` is a name no resolver knows (RFC 2606): only a test proxy
    that maps it to 127.0.0.1 reaches it.
    """

    ca: Path
    certificate: Path
    key: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """Generate a CA and a server certificate with the ``openssl`` command.

    Raises:
        RuntimeError: ``openssl`` is missing or failed (the tests skip).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is not installed")
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, certificate = directory / "server.key", directory / "server.csr", directory / "server.pem"
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost, DNS:backend.test\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n",
        encoding="utf-8",
    )
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        [
            *(openssl, "req", "-x509", *curve, "-keyout", ca_key, "-out", ca, "-days", "2"),
            *("-subj", "/CN=cipdplugin test CA", "-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        ],
        [openssl, "req", *curve, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [
            *(openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"),
            *("-out", certificate, "-days", "2", "-extfile", extensions),
        ],
    ]
    for command in commands:
        done = subprocess.run(
            [str(part) for part in command], capture_output=True, text=True, check=False, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"openssl failed: {done.stderr.strip()}")
    return TLSFiles(ca, certificate, key)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real backends do
    server: Any

    def setup(self) -> None:
        super().setup()
        if self.connection.family != socket.AF_UNIX:
            # Headers and body go out in two writes: no Nagle delay between them.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.backend._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.backend._closed_connection(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; what matters is recorded in PrpcBackend.received

    def address_string(self) -> str:
        return "unix" if isinstance(self.client_address, str) else str(self.client_address[0])

    def do_POST(self) -> None:
        self.server.backend._handle(self)


class _TCPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class PrpcBackend:
    """The backend; ``close()`` stops it and ends every connection.

    Args:
        repository: the metadata it serves.
        token: if set, calls must carry ``Authorization: Bearer <token>``.
        tls: serve https with these files.
        unix_socket: listen on this unix socket instead of 127.0.0.1.
    """

    def __init__(
        self,
        repository: StaticRepository,
        *,
        token: str | None = None,
        tls: TLSFiles | None = None,
        unix_socket: Path | None = None,
    ) -> None:
        self.repository = repository
        self.token = token
        self.stopping = threading.Event()
        # Guards the fields below; handler threads and the test thread share them.
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._received: list[Received] = []
        self._live: set[socket.socket] = set()  # open client connections
        self._connections = 0  # connections ever accepted
        self.server: socketserver.BaseServer
        if unix_socket is not None:
            self.server = _UnixServer(str(unix_socket), _Handler)
            self.url = ""
        else:
            self.server = _TCPServer(("127.0.0.1", 0), _Handler)
            port = self.server.server_address[1]
            self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
            if tls is not None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(tls.certificate, tls.key)
                tcp = self.server
                tcp.socket = context.wrap_socket(tcp.socket, server_side=True)
        self.server.backend = self  # type: ignore[union-attr]
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="prpc-backend", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> PrpcBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            live = list(self._live)
        for connection in live:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def inject(self, *faults: Fault) -> None:
        """Answer the next requests with ``faults``, in order."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def _opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._live.add(connection)
            self._connections += 1

    def _closed_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._live.discard(connection)

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = handler.rfile.read(length)
        request: ListMetadataRequest | None = ListMetadataRequest()
        try:
            request.ParseFromString(body)  # type: ignore[union-attr]
        except Exception:
            request = None
        with self._lock:
            self._received.append(Received(handler.path, dict(handler.headers.items()), request))
            fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.kind == "slow":
            self.stopping.wait(fault.seconds)
        elif fault is not None:
            self._play(handler, fault)
            return
        if handler.path != "/prpc/cipd.Repository/ListMetadata":
            self._answer(handler, 501, 12, f"no method {handler.path}".encode())
        elif self.token is not None and handler.headers.get("Authorization") != f"Bearer {self.token}":
            self._answer(handler, 401, 16, b"missing or wrong OAuth2 token\n")
        elif request is None:
            self._answer(handler, 400, 3, b"the request does not decode\n")
        else:
            try:
                answer = self.repository.list_metadata(request)
            except AdmissionError as exc:
                self._answer(handler, 400, exc.code.value[0], exc.message.encode())
                return
            self._answer(handler, 200, 0, answer.SerializeToString(), PRPC_BINARY)

    def _play(self, handler: _Handler, fault: Fault) -> None:
        if fault.kind == "code":
            self._answer(handler, 503 if fault.code == 14 else 500, fault.code, fault.message.encode())
        elif fault.kind == "html-503":
            self._raw(handler, 503, {"Content-Type": "text/html"}, HTML_503)
        elif fault.kind == "garbage":
            self._answer(handler, 200, 0, GARBAGE_BODY, PRPC_BINARY)
        elif fault.kind == "no-code":
            self._raw(handler, fault.status, {"Content-Type": "text/plain"}, fault.message.encode())
        elif fault.kind == "close":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise AssertionError(f"unknown fault {fault.kind}")

    def _answer(
        self, handler: _Handler, status: int, code: int, body: bytes, content_type: str = "text/plain"
    ) -> None:
        self._raw(handler, status, {"Content-Type": content_type, CODE_HEADER: str(code)}, body)

    def _raw(self, handler: _Handler, status: int, headers: dict[str, str], body: bytes) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("X-Content-Type-Options", "nosniff")
        handler.end_headers()
        handler.wfile.write(body)
