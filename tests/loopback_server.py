"""``LoopbackServer``: the skeleton of the tests' raw TCP servers on 127.0.0.1.

It accepts connections on a thread of its own and serves each on another
(``_serve``, which subclasses write); ``close()`` stops accepting, shuts
every connection still open and joins every thread it started. Subclasses
wait on ``stopping`` wherever they wait, so that ``close()`` ends them.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class LoopbackServer:
    """Accepts and serves connections on 127.0.0.1 at a port the OS picks."""

    #: Names the server's threads (``<name>-accept``, ``<name>-conn``).
    name = "loopback"

    def __init__(self) -> None:
        self.stopping = threading.Event()
        # Guards the fields below; connection threads and the test share them.
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, name=f"{self.name}-accept", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        self._acceptor.join(timeout=5)
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(
                target=self._serve_and_forget, args=(connection,), name=f"{self.name}-conn", daemon=True
            )
            with self._lock:
                self._connections.add(connection)
                self._threads.append(thread)
            thread.start()

    def _serve_and_forget(self, connection: socket.socket) -> None:
        try:
            self._serve(connection)
        finally:
            with self._lock:
                self._connections.discard(connection)

    def _serve(self, connection: socket.socket) -> None:
        raise NotImplementedError
