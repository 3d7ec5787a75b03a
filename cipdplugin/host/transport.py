"""Everything gRPC on the host side, for any plugin kind: the loopback server,
the tickets that tell plugins apart, each plugin's budget of calls, and the
routing of calls to the services of the plugin's kind.

* The server is grpcio's asyncio server, on an event loop of its own
  (one thread, ``cipdplugin-server-loop``), with a pool of threads beside
  it for the work that blocks (``requests``). A quick call (an answer, a
  message of the admissions stream) then costs no thread handoff at all,
  and a call waiting for the repository holds a pool thread, never the
  loop.
* Services are registered, not known: the host passes the ``Service``s of
  every kind (and of the ``cipd.plugin.Host`` service all kinds share) when
  it makes the server. A launched plugin's session names the servant of each
  service its kind offers; a call to a service the kind does not offer is
  UNIMPLEMENTED, as in the Go host's routers. This module imports no kind.
* The server's one handler (``_TicketGate``) runs on the loop before a call
  is served. A call without a ticket is UNAUTHENTICATED, one with an
  unknown ticket PERMISSION_DENIED, and a call beyond its plugin's budget
  RESOURCE_EXHAUSTED, each from a handler that never reads the request: no
  call can hold anything by never sending it.
* Each plugin has a budget of its own (``PLUGIN_CALL_BUDGET`` short calls
  open at once), so one plugin using up its budget delays no other plugin.
  Methods marked ``reserved`` are never refused for capacity: their bound
  is what the servant says a well-behaved plugin can have open (for
  answers, one per check it was asked).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from cipdplugin.constants import PLUGIN_CALL_BUDGET, SERVER_PENDING_CALLS, SERVER_START_TIMEOUT, TICKET_BYTES
from cipdplugin.deadline import Deadline
from cipdplugin.host.promises import run_callbacks_elsewhere
from cipdplugin.host.requests import Call, LoopPool, method_handler, refusal_handler
from cipdplugin.protocol import TICKET_METADATA_KEY
from cipdplugin.threads import DaemonThreads, leave_signals_to_the_main_thread

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from cipdplugin.host.process import PluginProcess

#: The server's thread pool has no bound of its own: the plugins' budgets
#: bound the calls, and so the threads, of each plugin.
_UNBOUNDED = 2**31


class ServerStartError(RuntimeError):
    """The plugin server could not listen on loopback."""


def new_ticket() -> str:
    """64 bytes from a cryptographic source, standard base64 without padding."""
    return base64.b64encode(secrets.token_bytes(TICKET_BYTES)).decode("ascii").rstrip("=")


@dataclass(frozen=True)
class Method:
    """One method of a service: how a call reaches its servant.

    ``serve(servant, request, call)`` answers the call (an async iterator of
    responses if ``streaming``), on the server's loop; with ``blocking``, on
    a thread of the server's pool. It fails the call by raising
    ``CallFailed``. ``reserved(servant)``, if given, makes the
    method one that is never refused for capacity: it returns how many such
    calls the plugin may have open at once, which a well-behaved plugin
    never exceeds.
    """

    name: str
    request_type: type[Message]
    response_type: type[Message]
    serve: Callable[[Any, Any, Call], Any]
    streaming: bool = False
    blocking: bool = False
    reserved: Callable[[Any], int] | None = None


@dataclass(frozen=True)
class Service:
    """A gRPC service plugins may call, by its full name (``cipd.plugin.Admissions``)."""

    name: str
    methods: tuple[Method, ...]


@dataclass(eq=False)
class PluginSession:
    """What the server knows about one launched plugin: its name, its ticket,
    the servant of each service its kind offers, and its calls open now."""

    name: str
    servants: Mapping[str, object]
    ticket: str = field(default_factory=new_ticket)
    process: PluginProcess | None = None
    # Guards the two counters below: the gate charges a call on gRPC's
    # event loop, the call's end gives it back on the loop or a pool thread.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    open_calls: int = 0  # short calls open now, against PLUGIN_CALL_BUDGET
    open_reserved: dict[str, int] = field(default_factory=dict)  # per reserved method path
    # The handler of each method this plugin may call, by path; made once per session.
    handlers: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], Method, object]] = field(
        default_factory=dict, repr=False
    )


class _TicketGate(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Finds each call's plugin by its ticket and charges the call to that
    plugin's budget, before the call is served. The server's one handler:
    grpcio asks it for every call, on the server's loop."""

    def __init__(self, sessions: Mapping[str, PluginSession], services: Sequence[Service]) -> None:
        self._sessions = sessions
        self._methods = frozenset(f"/{s.name}/{m.name}" for s in services for m in s.methods)
        self._missing = refusal_handler(
            grpc.StatusCode.UNAUTHENTICATED, f"missing {TICKET_METADATA_KEY} metadata"
        )
        self._unknown = refusal_handler(grpc.StatusCode.PERMISSION_DENIED, "unknown plugin ticket")
        self._not_offered = refusal_handler(
            grpc.StatusCode.UNIMPLEMENTED, "this service is not available to this kind of plugin"
        )
        self._exhausted = refusal_handler(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this plugin has {PLUGIN_CALL_BUDGET} calls open already; retry when some have ended",
        )

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        ticket = None
        for key, value in details.invocation_metadata or ():
            if key == TICKET_METADATA_KEY:
                ticket = value if isinstance(value, str) else ""
                break
        if ticket is None:
            return self._missing
        session = self._sessions.get(ticket)
        if session is None:
            return self._unknown
        path = details.method
        entry = session.handlers.get(path)
        if entry is None:
            # A method of another kind's service, or none at all ("Method not found").
            return self._not_offered if path in self._methods else None
        handler, method, servant = entry
        with session.lock:
            if method.reserved is None:
                if session.open_calls >= PLUGIN_CALL_BUDGET:
                    return self._exhausted
                session.open_calls += 1
            else:
                open_now = session.open_reserved.get(path, 0)
                if open_now >= method.reserved(servant):
                    return self._exhausted
                session.open_reserved[path] = open_now + 1
        return handler


def _session_handlers(session: PluginSession, services: Sequence[Service], pool: LoopPool) -> None:
    """Bind a handler to ``session`` for every method of the services its kind offers."""
    for service in services:
        servant = session.servants.get(service.name)
        if servant is None:
            continue
        for method in service.methods:
            path = f"/{service.name}/{method.name}"
            session.handlers[path] = (_bound_handler(session, servant, method, path, pool), method, servant)


def _bound_handler(
    session: PluginSession, servant: object, method: Method, path: str, pool: LoopPool
) -> grpc.RpcMethodHandler[Any, Any]:
    def serve(request: Any, call: Call) -> Any:
        return method.serve(servant, request, call)

    def release() -> None:
        with session.lock:
            if method.reserved is None:
                session.open_calls -= 1
            else:
                session.open_reserved[path] -= 1

    return method_handler(
        serve,
        method.request_type,
        method.response_type,
        pool=pool,
        streaming=method.streaming,
        blocking=method.blocking,
        on_end=release,
    )


class PluginServer:
    """One gRPC server on 127.0.0.1, started lazily, with a table of tickets.

    Its life is two Futures: ``started`` (the port, or why it cannot start)
    is resolved by the loop thread the first ``start()`` starts; ``stopped``
    once the server, its loop and its pool are done, after ``stop()``.
    """

    def __init__(self, services: Sequence[Service], logger: logging.Logger, *, port: int = 0) -> None:
        self._services = tuple(services)
        self._logger = logger
        self._requested_port = port
        self.started: futures.Future[int] = futures.Future()
        self.stopped: futures.Future[None] = futures.Future()
        # The work that blocks, and the callbacks of promises settled on the
        # loop, run here. Unbounded: the plugins' budgets bound its calls.
        self._pool = DaemonThreads(_UNBOUNDED, name="cipdplugin-server")
        self._loop_pool = LoopPool(self._pool)
        # Guards the fields below.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, once its thread runs
        self._loop_thread: threading.Thread | None = None  # started by the first start()
        self._stop_asked: asyncio.Event | None = None  # set on the loop to stop the server
        self._stop_deadline = Deadline(0.0)  # the first stop()'s; until then, no wait at the end
        self._stopping = False
        # Ticket -> session. Written under _lock; read without it on the loop
        # (a single dict lookup is atomic).
        self._sessions: dict[str, PluginSession] = {}

    @property
    def port(self) -> int:
        """The port the server listens on, or 0 before it starts."""
        return self.started.result() if self.started.done() and not self.started.exception() else 0

    @property
    def threads(self) -> int:
        """The server's pool threads started so far (for measurements)."""
        return self._pool.thread_count

    def serves_on_this_thread(self) -> bool:
        """Whether the calling thread is the server's loop or one of its pool's."""
        return self._pool.runs_on_this_thread() or threading.current_thread() is self._loop_thread

    def start(self) -> int:
        """Start the server if it has not started; return its port.

        Idempotent. A failure is final: every later call raises it again.

        Raises:
            ServerStartError: the server could not listen, or it was stopped.
        """
        with self._lock:
            if self._stopping and self._loop_thread is None:
                raise ServerStartError("the plugin server has been stopped")
            if self._loop_thread is None:
                self._loop_thread = threading.Thread(
                    target=self._serve, name="cipdplugin-server-loop", daemon=True
                )
                self._loop_thread.start()
        try:
            port = self.started.result(SERVER_START_TIMEOUT)
        except futures.TimeoutError:
            raise ServerStartError(
                f"the plugin server did not start within {SERVER_START_TIMEOUT:g} s"
            ) from None
        if self._stopping:
            raise ServerStartError("the plugin server has been stopped")
        return port

    def _serve(self) -> None:
        """The loop thread: the server's whole life, until ``stop()``."""
        leave_signals_to_the_main_thread()
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._report_loop_error)
        try:
            loop.run_until_complete(self._run_server(loop))
            self._end_tasks(loop)
        except BaseException as exc:  # nothing may leave ``started`` unresolved
            if not self.started.done():
                self.started.set_exception(ServerStartError(f"cannot start the plugin server: {exc!r}"))
            else:
                self._logger.exception("the plugin server failed")
        finally:
            loop.close()
            self._pool.stop(self._stop_deadline.remaining())
            self.stopped.set_result(None)

    def _end_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel what grpcio's stop left of its calls' tasks, and let them
        end (within the stop's deadline), so that none is destroyed pending."""
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=self._stop_deadline.remaining_or(1.0)))
        loop.run_until_complete(loop.shutdown_asyncgens())

    def _report_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """What asyncio reports of the loop's tasks: while stopping, grpcio's
        calls cut short (debug); before, a defect (an error)."""
        level = logging.DEBUG if self._stopping else logging.ERROR
        error = context.get("exception")
        self._logger.log(
            level, "plugin server: %s%s", context.get("message"), f": {error!r}" if error else ""
        )

    async def _run_server(self, loop: asyncio.AbstractEventLoop) -> None:
        # Promises settled on the loop (answers) run their callbacks on the pool.
        run_callbacks_elsewhere(self._pool.run_soon)
        self._loop_pool.bind(loop)
        stop_asked = asyncio.Event()
        # so_reuseport=0: no other process may bind our port beside us.
        # grpc's core refuses calls that wait long to be picked up once over
        # 1,000 wait: a burst of answers from one plugin can be more.
        server = grpc.aio.server(
            handlers=[_TicketGate(self._sessions, self._services)],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.server.max_pending_requests", SERVER_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", SERVER_PENDING_CALLS),
            ],
        )
        try:
            port = server.add_insecure_port(f"127.0.0.1:{self._requested_port}")
            if port == 0:
                raise RuntimeError(f"cannot bind 127.0.0.1:{self._requested_port}")
            await server.start()
        except Exception as exc:
            await server.stop(None)
            self.started.set_exception(ServerStartError(f"cannot start the plugin server: {exc}"))
            return
        with self._lock:
            self._loop, self._stop_asked = loop, stop_asked
            stopping = self._stopping
        self.started.set_result(port)
        if not stopping:
            await stop_asked.wait()
        # Active calls are cancelled at once (plugins then see CANCELLED or
        # UNAVAILABLE and stop); their handlers' ends run before it returns.
        await server.stop(None)

    def new_session(self, name: str, servants: Mapping[str, object]) -> PluginSession:
        """A session for a plugin about to be launched; ``register`` makes its ticket valid."""
        session = PluginSession(name=name, servants=servants)
        _session_handlers(session, self._services, self._loop_pool)
        return session

    def register(self, session: PluginSession) -> None:
        with self._lock:
            self._sessions[session.ticket] = session

    def forget(self, session: PluginSession) -> None:
        """Drop a session's ticket: its later RPCs get PERMISSION_DENIED."""
        with self._lock:
            if self._sessions.get(session.ticket) is session:
                del self._sessions[session.ticket]

    def stop(self, deadline: Deadline) -> None:
        """Stop serving and end the server's threads, waiting until ``deadline``.

        Active calls are cancelled at once. Blocking work still running on
        the pool (a repository call) is waited for until ``deadline``; its
        threads are daemons and end with it. Idempotent.
        """
        self.begin_stop(deadline)
        futures.wait([self.stopped], deadline.remaining())

    def begin_stop(self, deadline: Deadline) -> None:
        """``stop()`` without the wait: the loop thread stops the server by ``deadline``."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            if first:
                self._stop_deadline = deadline
            loop, stop_asked, thread = self._loop, self._stop_asked, self._loop_thread
            self._sessions.clear()
        if not first:
            return
        if thread is None:  # never started
            self._pool.stop(deadline.remaining())
            self.stopped.set_result(None)
        elif loop is not None and stop_asked is not None:
            with contextlib.suppress(RuntimeError):  # the loop ended already (it failed)
                loop.call_soon_threadsafe(stop_asked.set)
        # Else the loop is still starting: it sees _stopping once it has.
