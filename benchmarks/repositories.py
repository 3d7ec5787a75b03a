"""Metadata backends for the backend-bound benchmarks: a repository in the
host's process, and a pRPC server on loopback for ``PrpcRepository``, run
in a process of its own (``PrpcDigestServer``) so that serving HTTP takes
nothing from the host's interpreter.

Both serve what ``go-host-driver -allow-md`` serves, so that our host and
the Go host face the same backend: for any instance, ``entries``
``allowed-sha256`` entries, newest first, decoys first and the instance's
own hex digest last, filtered by ``keys`` and paged by ``page_size`` (20
when unset) and ``page_token``; each call answered after ``latency``
seconds, concurrent calls waiting concurrently. Both count their calls and
the most that were in flight at once.
"""

from __future__ import annotations

import http.server
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cipdplugin.backend import CODE_HEADER, PRPC_BINARY
from cipdplugin.protocol.cipd_pb2 import InstanceMetadata, ListMetadataRequest, ListMetadataResponse

ALLOWED_KEY = "allowed-sha256"
DEFAULT_PAGE_SIZE = 20


class DigestRepository:
    """A ``RepositoryClient`` whose every instance carries its own digest (see the module)."""

    def __init__(self, latency: float, entries: int = 1) -> None:
        if entries < 1:
            raise ValueError(f"entries must be at least 1, got {entries}")
        self.latency = latency
        self.entries = entries
        # Guards the three counters below.
        self._lock = threading.Lock()
        self.calls = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.latency > 0:
                time.sleep(self.latency)
            return self._page(request)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _page(self, request: ListMetadataRequest) -> ListMetadataResponse:
        if request.keys and ALLOWED_KEY not in request.keys:
            return ListMetadataResponse()
        values = [f"{n:064x}" for n in range(self.entries - 1)] + [request.instance.hex_digest]
        start = int(request.page_token or "0")
        end = start + (request.page_size or DEFAULT_PAGE_SIZE)
        page = ListMetadataResponse(
            metadata=[InstanceMetadata(key=ALLOWED_KEY, value=value.encode()) for value in values[start:end]]
        )
        if end < len(values):
            page.next_page_token = str(end)
        return page


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real backend
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: no Nagle delay between them.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/prpc/cipd.Repository/ListMetadata":
            self._answer(404, 12, b"no such method", "text/plain")
            return
        answer = self.server.repository.list_metadata(ListMetadataRequest.FromString(body))
        self._answer(200, 0, answer.SerializeToString(), PRPC_BINARY)

    def _answer(self, status: int, code: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header(CODE_HEADER, str(code))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # A burst of connections must not overflow the listen queue: a dropped
    # SYN is retried after a second, which would be measured as latency.
    request_queue_size = 1024

    def __init__(self, repository: DigestRepository) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repository = repository


class PrpcDigestServer:
    """``cipd.Repository/ListMetadata`` over pRPC (binary) on 127.0.0.1, from a
    ``DigestRepository`` in a child process (this module run as a program);
    a thread per connection. ``close()`` stops it and returns its counters."""

    def __init__(self, latency: float, entries: int = 1) -> None:
        self._process = subprocess.Popen(
            [sys.executable, __file__, repr(latency), str(entries)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], _START_LIMIT)
        line = self._process.stdout.readline() if ready else ""
        if not line.startswith("port "):
            self._process.kill()
            self._process.wait()
            raise RuntimeError(f"the pRPC server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def close(self) -> dict[str, int]:
        """Stop the server; its ``calls`` and ``peak_in_flight``."""
        try:
            stdout, _ = self._process.communicate("", timeout=_START_LIMIT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise
        counters: dict[str, int] = json.loads(stdout.strip().splitlines()[-1])
        return counters


#: Bound on the server's start and stop.
_START_LIMIT = 30.0


def _serve(latency: float, entries: int) -> int:
    """The child: serve until stdin closes, then print the counters."""
    repository = DigestRepository(latency, entries)
    server = _Server(repository)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    print(f"port {server.server_address[1]}", flush=True)
    sys.stdin.read()  # Cannot hang: the benchmark closes it (or dies).
    server.shutdown()
    server.server_close()
    print(json.dumps({"calls": repository.calls, "peak_in_flight": repository.peak_in_flight}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(float(sys.argv[1]), int(sys.argv[2])))
