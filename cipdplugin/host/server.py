"""The host's loopback gRPC server and the tickets that tell plugins apart.

Transport only: which services run on the server is decided by the host,
and what a plugin may do is decided by its controller. Every RPC is routed
by its ``x-plugin-ticket`` metadata to the ``PluginSession`` it belongs to.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from cipdplugin.protocol import TICKET_METADATA_KEY

#: Tickets are this many random bytes (before base64).
TICKET_BYTES = 64
#: Upper bound on server threads. Each connected admission plugin holds one
#: for its stream; short RPCs reuse idle ones. Threads are created on demand.
MAX_SERVER_THREADS = 1024


class ServerStartError(RuntimeError):
    """The plugin server could not listen on loopback."""


def new_ticket() -> str:
    """64 bytes from a cryptographic source, standard base64 without padding."""
    return base64.b64encode(secrets.token_bytes(TICKET_BYTES)).decode("ascii").rstrip("=")


@dataclass(eq=False)
class PluginSession:
    """What the server knows about one launched plugin.

    ``controller`` is the plugin kind's object (for instance an
    ``AdmissionPlugin``); services check its type before serving it.
    ``process`` is set right after the launch, before the handshake.
    """

    name: str
    controller: Any
    ticket: str = field(default_factory=new_ticket)
    process: Any = None


class PluginServer:
    """One gRPC server on 127.0.0.1, started lazily, with a table of tickets."""

    def __init__(self, *, port: int = 0) -> None:
        self._handlers: list[grpc.GenericRpcHandler[Any, Any]] = []  # fixed once started
        self._requested_port = port
        # Guards the fields below.
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None  # set once started
        self._executor: futures.ThreadPoolExecutor | None = None  # the server's threads
        self._port = 0  # the bound port, once started
        self._start_error: ServerStartError | None = None  # a failed start, final
        self._stopped = False
        # Ticket -> session. Written under _lock; read without it on the RPC
        # path (a single dict lookup is atomic).
        self._sessions: dict[str, PluginSession] = {}

    @property
    def port(self) -> int:
        """The port the server listens on, or 0 before it starts."""
        return self._port

    def add_handlers(self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]) -> None:
        """Add services; only before the server starts."""
        with self._lock:
            if self._server is not None or self._stopped:
                raise RuntimeError("services must be added before the plugin server starts")
            self._handlers.extend(handlers)

    def start(self) -> int:
        """Start the server if it has not started; return its port.

        Idempotent. A failure is final: every later call raises it again.

        Raises:
            ServerStartError: the server could not listen, or it was stopped.
        """
        with self._lock:
            if self._start_error is not None:
                raise self._start_error
            if self._stopped:
                raise ServerStartError("the plugin server has been stopped")
            if self._server is not None:
                return self._port
            executor = futures.ThreadPoolExecutor(MAX_SERVER_THREADS, thread_name_prefix="cipdplugin-server")
            # so_reuseport=0: no other process may bind our port beside us.
            server = grpc.server(
                executor,
                handlers=self._handlers,
                options=[("grpc.so_reuseport", 0)],
            )
            try:
                port = server.add_insecure_port(f"127.0.0.1:{self._requested_port}")
                if port == 0:
                    raise RuntimeError(f"cannot bind 127.0.0.1:{self._requested_port}")
                server.start()
            except Exception as exc:
                server.stop(None)
                executor.shutdown(wait=False)
                self._start_error = ServerStartError(f"cannot start the plugin server: {exc}")
                raise self._start_error from None
            self._server, self._executor, self._port = server, executor, port
            return port

    def register(self, session: PluginSession) -> None:
        with self._lock:
            self._sessions[session.ticket] = session

    def forget(self, session: PluginSession) -> None:
        """Drop a session's ticket: its later RPCs get PERMISSION_DENIED."""
        with self._lock:
            if self._sessions.get(session.ticket) is session:
                del self._sessions[session.ticket]

    def session_for(self, context: grpc.ServicerContext) -> PluginSession:
        """The session an RPC belongs to; aborts the RPC if there is none.

        Missing ticket: UNAUTHENTICATED. Unknown ticket: PERMISSION_DENIED.
        """
        ticket = None
        for key, value in context.invocation_metadata():
            if key == TICKET_METADATA_KEY:
                ticket = value
                break
        if ticket is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing {TICKET_METADATA_KEY} metadata")
        session = self._sessions.get(ticket) if isinstance(ticket, str) else None
        if session is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown plugin ticket")
        return session

    def stop(self, timeout: float) -> None:
        """Stop serving and join the server's threads, within ``timeout``.

        Active RPCs are cancelled at once (plugins then see CANCELLED or
        UNAVAILABLE and stop). Idempotent.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopped = True
            server, executor = self._server, self._executor
            self._server = self._executor = None
            self._sessions.clear()
        if server is None or executor is None:
            return
        server.stop(grace=None).wait(max(0.0, deadline - time.monotonic()))
        executor.shutdown(wait=False)
        # ThreadPoolExecutor offers no bounded join; its threads are known.
        for thread in list(getattr(executor, "_threads", ())):
            if thread is threading.current_thread():
                continue  # close() called from a Future callback on a server thread
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logging.getLogger(__name__).warning(
                    "plugin server thread %s did not stop in time", thread.name
                )
