"""Everything gRPC on the host side, in one layer: the loopback server, the
tickets that tell plugins apart, and every service plugins call.

* A server interceptor checks each call's ``x-plugin-ticket`` before the call
  may take a server thread: a call without a valid ticket is refused at once,
  so it cannot hold a thread by never sending its request.
* ``Host.Log`` and ``Host.ListMetadata`` serve any plugin.
* ``Admissions`` routes each call to the ``AdmissionPlugin`` its ticket names
  and drives that plugin's stream through its four methods; the plugin knows
  nothing of gRPC.
* All handlers come from one table, ``_METHODS``.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.config import Config
from cipdplugin.constants import MAX_CONCURRENT_RPCS, STREAM_RECHECK, TICKET_BYTES
from cipdplugin.deadline import Deadline
from cipdplugin.errors import AdmissionError
from cipdplugin.host.admission import AdmissionPlugin
from cipdplugin.host.requests import method_handler
from cipdplugin.protocol import TICKET_METADATA_KEY, cipd_pb2, plugin_pb2
from cipdplugin.status import rpc_error_parts
from cipdplugin.text import printable
from cipdplugin.threads import DaemonThreads

if TYPE_CHECKING:
    from cipdplugin.host.process import PluginProcess

#: Log severities of the protocol and the logging levels they map to.
SEVERITY_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class ServerStartError(RuntimeError):
    """The plugin server could not listen on loopback."""


def new_ticket() -> str:
    """64 bytes from a cryptographic source, standard base64 without padding."""
    return base64.b64encode(secrets.token_bytes(TICKET_BYTES)).decode("ascii").rstrip("=")


@dataclass(eq=False)
class PluginSession:
    """What the server knows about one launched plugin.

    ``controller`` is the plugin kind's object (for instance an
    ``AdmissionPlugin``); each service checks its type before serving it.
    ``process`` is set right after the launch, before the handshake.
    """

    name: str
    controller: object
    ticket: str = field(default_factory=new_ticket)
    process: PluginProcess | None = None


def _refuse(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that ends a call at once. Stream-shaped on purpose: it runs
    without reading the request, which a call that never sends one would make
    a unary handler wait for."""

    def refuse(requests: Any, context: grpc.ServicerContext) -> NoReturn:
        context.abort(code, details)

    return grpc.stream_unary_rpc_method_handler(refuse)


class _TicketGate(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without a known ticket before they take a server thread
    for longer than it takes to say so: missing, UNAUTHENTICATED; unknown,
    PERMISSION_DENIED. Runs on gRPC's polling thread, so it only reads."""

    def __init__(self, sessions: dict[str, PluginSession]) -> None:
        self._sessions = sessions
        self._missing = _refuse(grpc.StatusCode.UNAUTHENTICATED, f"missing {TICKET_METADATA_KEY} metadata")
        self._unknown = _refuse(grpc.StatusCode.PERMISSION_DENIED, "unknown plugin ticket")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        ticket = _ticket(details.invocation_metadata)
        if ticket is None:
            return self._missing
        if ticket not in self._sessions:
            return self._unknown
        return continuation(details)


def _ticket(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == TICKET_METADATA_KEY:
            return value if isinstance(value, str) else ""
    return None


class PluginServer:
    """One gRPC server on 127.0.0.1, started lazily, with a table of tickets.

    Its life is two Futures: ``started`` (the port, or why it cannot start)
    is resolved by the first ``start()``; ``stopped`` by the helper thread
    that ``stop()`` starts, once the server and its threads are done.
    """

    def __init__(self, config: Callable[[], Config | None], logger: logging.Logger, *, port: int = 0) -> None:
        self._config = config
        self._logger = logger
        self._requested_port = port
        self.started: futures.Future[int] = futures.Future()
        self.stopped: futures.Future[None] = futures.Future()
        # Guards the fields below.
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None  # set once started
        self._pool: DaemonThreads | None = None  # the server's threads, once started
        self._stopping = False
        # Ticket -> session. Written under _lock; read without it on the RPC
        # path (a single dict lookup is atomic).
        self._sessions: dict[str, PluginSession] = {}

    @property
    def port(self) -> int:
        """The port the server listens on, or 0 before it starts."""
        return self.started.result() if self.started.done() and not self.started.exception() else 0

    def start(self) -> int:
        """Start the server if it has not started; return its port.

        Idempotent. A failure is final: every later call raises it again.

        Raises:
            ServerStartError: the server could not listen, or it was stopped.
        """
        with self._lock:
            if self._stopping and not self.started.done():
                raise ServerStartError("the plugin server has been stopped")
            if not self.started.done():
                self._start_locked()
        if self._stopping and self.started.exception() is None:
            raise ServerStartError("the plugin server has been stopped")
        return self.started.result()

    def _start_locked(self) -> None:
        threads = DaemonThreads(MAX_CONCURRENT_RPCS, name="cipdplugin-server")
        # so_reuseport=0: no other process may bind our port beside us.
        server = grpc.server(
            threads,  # type: ignore[arg-type]
            handlers=_handlers(self),
            interceptors=[_TicketGate(self._sessions)],
            options=[("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        try:
            port = server.add_insecure_port(f"127.0.0.1:{self._requested_port}")
            if port == 0:
                raise RuntimeError(f"cannot bind 127.0.0.1:{self._requested_port}")
            server.start()
        except Exception as exc:
            server.stop(None)
            threads.stop()
            self.started.set_exception(ServerStartError(f"cannot start the plugin server: {exc}"))
            return
        self._server, self._pool = server, threads
        self.started.set_result(port)

    def register(self, session: PluginSession) -> None:
        with self._lock:
            self._sessions[session.ticket] = session

    def forget(self, session: PluginSession) -> None:
        """Drop a session's ticket: its later RPCs get PERMISSION_DENIED."""
        with self._lock:
            if self._sessions.get(session.ticket) is session:
                del self._sessions[session.ticket]

    def stop(self, timeout: float) -> None:
        """Stop serving and end the server's threads, waiting at most ``timeout``.

        Active calls are cancelled at once (plugins then see CANCELLED or
        UNAVAILABLE and stop). The stop runs on a helper thread, because
        grpcio's ``stop`` waits without a limit for every running handler;
        the helper finishes on its own if this wait gives up. Idempotent.
        """
        deadline = Deadline(timeout)
        with self._lock:
            first = not self._stopping
            self._stopping = True
            server, threads = self._server, self._pool
            self._server = self._pool = None
            self._sessions.clear()
        if first:
            if server is None or threads is None:
                self.stopped.set_result(None)
            else:
                threading.Thread(
                    target=self._stop_server,
                    args=(server, threads, deadline),
                    name="cipdplugin-server-stop",
                    daemon=True,
                ).start()
        futures.wait([self.stopped], deadline.remaining())

    def _stop_server(self, server: grpc.Server, threads: DaemonThreads, deadline: Deadline) -> None:
        try:
            server.stop(grace=None).wait(deadline.remaining())
            threads.stop(deadline.remaining())
        finally:
            self.stopped.set_result(None)

    # -- Routing ---------------------------------------------------------------

    def session(self, context: grpc.ServicerContext) -> PluginSession:
        """The session a call belongs to; aborts the call if there is none.

        The ticket gate refused calls without a known ticket already; this
        covers a ticket forgotten since.
        """
        ticket = _ticket(context.invocation_metadata())
        if ticket is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing {TICKET_METADATA_KEY} metadata")
        session = self._sessions.get(ticket)
        if session is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown plugin ticket")
        return session

    def _admission_plugin(self, context: grpc.ServicerContext) -> tuple[AdmissionPlugin, PluginSession]:
        session = self.session(context)
        if not isinstance(session.controller, AdmissionPlugin):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this plugin is not an admission plugin")
        return session.controller, session

    # -- cipd.plugin.Host --------------------------------------------------------

    def log(self, request: plugin_pb2.LogRequest, context: grpc.ServicerContext) -> Empty:
        session = self.session(context)
        # An unknown severity is still worth showing: log it as info.
        level = SEVERITY_LEVELS.get(request.severity.lower(), logging.INFO)
        self._logger.log(level, "Plugin '%s': %s", session.name, printable(request.message))
        return Empty()

    def list_metadata(
        self, request: plugin_pb2.ListMetadataRequest, context: grpc.ServicerContext
    ) -> plugin_pb2.ListMetadataResponse:
        self.session(context)
        config = self._config()
        if config is None:
            context.abort(grpc.StatusCode.INTERNAL, "the host has no config: call Host.initialize first")
        if config.repository is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the host has no metadata repository")
        if request.service_url != config.service_url:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"metadata of {request.service_url!r} is not available, only of {config.service_url!r}",
            )
        query = cipd_pb2.ListMetadataRequest(
            package=request.package,
            instance=request.instance,
            keys=request.keys,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        try:
            answer = config.repository.list_metadata(query)
        except AdmissionError as exc:
            context.abort(exc.code, exc.message)
        except grpc.RpcError as exc:
            context.abort(*rpc_error_parts(exc))
        except Exception as exc:
            self._logger.exception("metadata repository failed")
            context.abort(grpc.StatusCode.INTERNAL, f"metadata repository failed: {exc!r}")
        except BaseException as exc:
            # KeyboardInterrupt or SystemExit raised by the repository's code
            # on this server thread: no interpreter exit is asked of a server
            # thread, but the plugin must get an answer rather than wait.
            if threading.current_thread() is threading.main_thread():
                raise
            self._logger.error("metadata repository raised %r", exc)
            context.abort(grpc.StatusCode.INTERNAL, f"metadata repository failed: {exc!r}")
        return plugin_pb2.ListMetadataResponse(
            metadata=answer.metadata, next_page_token=answer.next_page_token
        )

    # -- cipd.plugin.Admissions ------------------------------------------------

    def list_admissions(
        self, request: plugin_pb2.ListAdmissionsRequest, context: grpc.ServicerContext
    ) -> Iterator[plugin_pb2.Admission]:
        plugin, session = self._admission_plugin(context)
        refusal = plugin.on_connected(request)
        if refusal is not None:
            if refusal.final:
                self.forget(session)
                answered = refusal.answered
                if not context.add_callback(lambda: answered.set_result(None)):
                    answered.set_result(None)
            context.abort(refusal.code, refusal.message)
        # The callback runs on gRPC's polling thread: plugin.wake never blocks.
        if not context.add_callback(plugin.wake):
            plugin.on_disconnected()
            return
        try:
            while context.is_active():
                batch = plugin.next_admissions(STREAM_RECHECK)
                if batch is None:
                    break
                yield from batch
                # Not kept while the next wait blocks: a burst's last batch
                # would otherwise stay alive as long as the stream idles.
                del batch
        finally:
            plugin.on_disconnected()
        if context.is_active():
            context.abort(grpc.StatusCode.ABORTED, "terminating")

    def resolve_admission(
        self, request: plugin_pb2.ResolveAdmissionRequest, context: grpc.ServicerContext
    ) -> Empty:
        plugin, _ = self._admission_plugin(context)
        plugin.resolve(request.admission_id, request.status if request.HasField("status") else None)
        return Empty()


#: Every method the host serves: service, method, handler kind, the
#: PluginServer method, the request type and the response type.
_METHODS: tuple[tuple[str, str, Callable[..., grpc.RpcMethodHandler[Any, Any]], str, Any, Any], ...] = (
    ("cipd.plugin.Host", "Log", grpc.unary_unary_rpc_method_handler, "log", plugin_pb2.LogRequest, Empty),
    (
        "cipd.plugin.Host",
        "ListMetadata",
        grpc.unary_unary_rpc_method_handler,
        "list_metadata",
        plugin_pb2.ListMetadataRequest,
        plugin_pb2.ListMetadataResponse,
    ),
    (
        "cipd.plugin.Admissions",
        "ListAdmissions",
        grpc.unary_stream_rpc_method_handler,
        "list_admissions",
        plugin_pb2.ListAdmissionsRequest,
        plugin_pb2.Admission,
    ),
    (
        "cipd.plugin.Admissions",
        "ResolveAdmission",
        grpc.unary_unary_rpc_method_handler,
        "resolve_admission",
        plugin_pb2.ResolveAdmissionRequest,
        Empty,
    ),
)


def _handlers(server: PluginServer) -> list[grpc.GenericRpcHandler[Any, Any]]:
    services: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for service, method, kind, attribute, request, response in _METHODS:
        services.setdefault(service, {})[method] = method_handler(
            kind, getattr(server, attribute), request, response
        )
    return [grpc.method_handlers_generic_handler(name, methods) for name, methods in services.items()]
