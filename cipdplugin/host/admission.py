"""Admission plugins, host side: promises, the bounded queue, and the
``cipd.plugin.Admissions`` service that feeds them to the plugin process.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.errors import (
    AdmissionDenied,
    AdmissionError,
    PluginAbortedError,
    PluginStartError,
)
from cipdplugin.host.process import termination_span
from cipdplugin.host.requests import method_handler
from cipdplugin.pins import Pin
from cipdplugin.protocol import PROTOCOL_VERSION, plugin_pb2

if TYPE_CHECKING:
    from cipdplugin.host.host import Host
    from cipdplugin.host.process import PluginProcess
    from cipdplugin.host.server import PluginServer, PluginSession

DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_MAX_PENDING = 1024
#: After the stream breaks, how long to wait for the exit status to report it.
_EXIT_STATUS_WAIT = 1.0
#: Bound on close() waiting for a launch in progress (Popen plus server start).
_LAUNCH_JOIN = 2.0
_OK = grpc.StatusCode.OK.value[0]
_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class AdmissionFuture(Future[None]):
    """A shared admission promise: callers may wait on it but not cancel it."""

    def __init__(self) -> None:
        super().__init__()
        # Memory: resolved promises stay cached by the hundred thousand, and
        # the waiter deque that threading.Condition allocates up front (a
        # 64-slot block, 760 bytes) is over a third of each. Condition only
        # appends to, removes from, indexes, clears and measures it (CPython
        # 3.10 to 3.14), which a list does as well for a promise's few waiters.
        # Later versions keep the deque until someone has checked them.
        condition: Any = self._condition
        if sys.version_info < (3, 15) and type(getattr(condition, "_waiters", None)) is deque:
            condition._waiters = []

    def cancel(self) -> bool:
        return False


class PluginState(enum.Enum):
    NOT_STARTED = "not started"  # no check yet, no process
    STARTING = "starting"  # launching, or waiting for ListAdmissions
    CONNECTED = "connected"  # the stream is open; checks flow
    BROKEN = "broken"  # failed for good; ``_failure`` says why
    CLOSED = "closed"  # closed by the caller


_ALIVE = (PluginState.NOT_STARTED, PluginState.STARTING, PluginState.CONNECTED)


def admission_id(admission: plugin_pb2.Admission, salt: bytes) -> str:
    """The ID of an admission: base64 (standard, unpadded) of SHA-256 over
    ``salt + b"\\n"`` and the deterministic serialization of the admission
    without its ID."""
    without_id = admission
    if admission.admission_id:
        without_id = plugin_pb2.Admission()
        without_id.CopyFrom(admission)
        without_id.ClearField("admission_id")
    digest = hashlib.sha256(salt + b"\n" + without_id.SerializeToString(deterministic=True)).digest()
    return base64.b64encode(digest).decode("ascii").rstrip("=")


class AdmissionPlugin:
    """One admission plugin subprocess, asked about pins through promises.

    Created by ``Host.new_admission_plugin``; nothing runs until the first
    ``check_admission``. Thread-safe.
    """

    def __init__(
        self,
        host: Host,
        cmdline: Sequence[str],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        self._host = host
        self._cmdline = list(cmdline)
        self._name = os.path.basename(self._cmdline[0])
        self._connect_timeout = connect_timeout
        self._max_pending = max_pending
        self._salt = str(os.getpid()).encode()
        self._logger = host.logger

        # One lock guards all fields below. Two conditions share it so that
        # producers and the stream wake only each other's counterpart.
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)  # queue non-empty, or state changed
        self._has_room = threading.Condition(self._lock)  # queue has room, or state changed
        self._state = PluginState.NOT_STARTED
        self._failure: AdmissionError | None = None  # why, once BROKEN or CLOSED
        self._promises: dict[Pin, AdmissionFuture] = {}  # the cache, by pin
        self._in_flight: dict[str, AdmissionFuture] = {}  # unresolved, by admission ID
        self._queue: deque[plugin_pb2.Admission] = deque()  # not yet sent to the plugin
        self._stream_claimed = False  # ListAdmissions was called once
        self._process: PluginProcess | None = None  # once launched
        self._launcher: threading.Thread | None = None  # launches and awaits the connection

    @property
    def executable(self) -> str:
        """The plugin's executable, ``cmdline[0]``."""
        return self._cmdline[0]

    @property
    def state(self) -> PluginState:
        return self._state

    def __repr__(self) -> str:
        return f"<AdmissionPlugin {self._name!r} {self._state.value}>"

    # -- The caller's side -------------------------------------------------

    def check_admission(self, pin: Pin | str) -> Future[None]:
        """Ask the plugin whether ``pin`` may be deployed.

        Returns a Future that resolves to None if admitted, or holds
        ``AdmissionDenied``, ``AdmissionError``, ``PluginStartError`` or
        ``PluginAbortedError``. The same pin gets the same Future until
        ``clear_cache()``. The first call starts the plugin in the background.
        Blocks only while ``max_pending`` checks wait to be sent, until there
        is room or the plugin breaks or closes.

        Raises:
            InvalidPinError: ``pin`` is a malformed ``"package:instance_id"`` string.
        """
        if not isinstance(pin, Pin):
            pin = Pin.parse(pin)
        launch = False
        with self._lock:
            while True:
                future = self._promises.get(pin)
                if future is not None:
                    return future
                if self._state not in _ALIVE or len(self._queue) < self._max_pending:
                    break
                # Cannot hang: the stream makes room, and every way the plugin
                # can end (crash, close, connect timeout) notifies.
                self._has_room.wait()
            future = AdmissionFuture()
            self._promises[pin] = future
            if self._state not in _ALIVE:
                assert self._failure is not None
                future.set_exception(self._failure)
                return future
            admission = plugin_pb2.Admission(
                service_url=self._host.service_url,
                package=pin.package,
                instance=pin.object_ref,
            )
            admission.admission_id = admission_id(admission, self._salt)
            self._in_flight[admission.admission_id] = future
            self._queue.append(admission)
            self._has_work.notify()
            if self._state is PluginState.NOT_STARTED:
                self._state = PluginState.STARTING
                launch = True
        if launch:
            self._launcher = threading.Thread(
                target=self._launch_and_await, name=f"cipdplugin-launch-{self._name}", daemon=True
            )
            self._launcher.start()
        return future

    def clear_cache(self) -> None:
        """Forget resolved promises; pending ones stay shared."""
        with self._lock:
            self._promises = {pin: f for pin, f in self._promises.items() if not f.done()}

    def close(self, timeout: float | None = None) -> None:
        """Fail pending checks with ``PluginAbortedError`` and terminate the plugin.

        Later checks fail at once the same way. Idempotent; safe while the
        plugin is still starting. Returns within the termination deadline
        (5 s, or ``timeout`` if shorter) plus a small constant.
        """
        deadline = time.monotonic() + termination_span(timeout)
        self._reject_all(PluginAbortedError(f"plugin {self._name!r} was closed"), PluginState.CLOSED)
        launcher = self._launcher
        if launcher is not None and launcher is not threading.current_thread():
            launcher.join(min(_LAUNCH_JOIN, max(0.0, deadline - time.monotonic())))
        process = self._process
        if process is not None:
            process.terminate(max(0.0, deadline - time.monotonic()))

    # -- The single funnel every ending goes through -------------------------

    def _reject_all(self, error: AdmissionError, state: PluginState = PluginState.BROKEN) -> bool:
        """Fail every unresolved check with ``error`` and leave the alive states.

        The first ending decides the error later checks get; a close after a
        break only records that the plugin is closed. Returns whether this
        call ended the plugin.
        """
        with self._lock:
            if self._state not in _ALIVE:
                if state is PluginState.CLOSED:
                    self._state = PluginState.CLOSED
                return False
            self._state = state
            self._failure = error
            rejected = list(self._in_flight.values())
            self._in_flight.clear()
            self._queue.clear()
            self._has_work.notify_all()
            self._has_room.notify_all()
        # Outside the lock: Future callbacks run arbitrary code.
        for future in rejected:
            future.set_exception(error)
        if state is PluginState.BROKEN:
            self._logger.warning("Plugin '%s': %s", self._name, error.message)
        return True

    # -- The launcher thread -------------------------------------------------

    def _launch_and_await(self) -> None:
        """Launch the plugin and fail everything if it does not connect in time."""
        try:
            process = self._host.launch_plugin(self._cmdline, self)
        except PluginStartError as exc:
            # Host.close() races with this launch: it refuses the launch before
            # its thread gets to close this plugin. That is a close, not a
            # failure to start, and pending checks must say so.
            if self._host.closed:
                self._reject_all(PluginAbortedError(f"plugin {self._name!r} was closed"), PluginState.CLOSED)
            else:
                self._reject_all(exc)
            return
        except Exception as exc:
            self._reject_all(PluginStartError(f"cannot start plugin {self.executable!r}: {exc}"))
            return
        deadline = time.monotonic() + self._connect_timeout
        with self._lock:
            self._process = process
            while self._state is PluginState.STARTING:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._has_work.wait(remaining)
            timed_out = self._state is PluginState.STARTING
            closed = self._state is PluginState.CLOSED
        if timed_out:
            self._reject_all(
                PluginStartError(
                    f"plugin {self.executable!r} did not connect within {self._connect_timeout:g} s",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            )
            process.terminate()
        elif closed:
            # close() may have given up waiting for this launch; make sure
            # the process does not outlive the plugin.
            process.terminate()

    # -- Hooks called by the host ------------------------------------------

    def plugin_exited(self, process: PluginProcess) -> None:
        """The process ended: fail whatever it left unresolved."""
        if self._state is PluginState.STARTING:
            self._reject_all(PluginStartError(f"{process.describe()} before connecting"))
        else:
            self._reject_all(PluginAbortedError(f"{process.describe()} while checks were pending"))

    # -- The Admissions service, for this plugin's session -------------------

    def serve_admissions(
        self,
        request: plugin_pb2.ListAdmissionsRequest,
        context: grpc.ServicerContext,
        refuse: Callable[[], None],
    ) -> Iterator[plugin_pb2.Admission]:
        """The ListAdmissions stream: hand queued checks to the plugin until it ends.

        ``refuse`` forgets the plugin's ticket and closes its stdin; it is
        called when the plugin speaks another protocol version.
        """
        with self._lock:
            claimed, self._stream_claimed = self._stream_claimed, True
        if claimed:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "ListAdmissions was already called")
        if request.protocol_version != PROTOCOL_VERSION:
            message = (
                f"plugin {self.executable!r} speaks admission protocol version "
                f"{request.protocol_version}, the host speaks {PROTOCOL_VERSION}"
            )
            self._reject_all(PluginStartError(message, grpc.StatusCode.FAILED_PRECONDITION))
            refuse()
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        with self._lock:
            if self._state is PluginState.STARTING:
                self._state = PluginState.CONNECTED
                self._has_work.notify_all()
            connected = self._state is PluginState.CONNECTED
        if not connected:
            context.abort(grpc.StatusCode.ABORTED, "terminating")
        if not context.add_callback(self._wake_stream):
            self._stream_ended()
            return
        self._logger.debug("Plugin '%s' connected (version %r)", self._name, request.plugin_version)
        try:
            while True:
                with self._lock:
                    # Cannot hang: woken by new checks, by every ending, and
                    # by the RPC's termination callback.
                    while not self._queue and self._state is PluginState.CONNECTED and context.is_active():
                        self._has_work.wait()
                    if self._state is not PluginState.CONNECTED or not context.is_active():
                        break
                    batch = list(self._queue)
                    self._queue.clear()
                    self._has_room.notify_all()
                yield from batch
        finally:
            ended_by_us = self._state is not PluginState.CONNECTED
            if not ended_by_us:
                self._stream_ended()
        context.abort(grpc.StatusCode.ABORTED, "terminating")

    def resolve_admission(self, request: plugin_pb2.ResolveAdmissionRequest) -> None:
        """Settle one check; unknown IDs (already settled, or never ours) are ignored."""
        with self._lock:
            future = self._in_flight.pop(request.admission_id, None)
        if future is None:
            return
        if not request.HasField("status") or request.status.code == _OK:
            future.set_result(None)
            return
        code = _CODES.get(request.status.code, grpc.StatusCode.UNKNOWN)
        if request.status.code == _FAILED_PRECONDITION:
            future.set_exception(AdmissionDenied(request.status.message))
        else:
            future.set_exception(AdmissionError(code, request.status.message))

    def _wake_stream(self) -> None:
        with self._lock:
            self._has_work.notify_all()

    def _stream_ended(self) -> None:
        """The plugin's stream ended without our asking: the plugin is done for."""
        process = self._process
        # The exit status makes a better message; a crashing plugin's exit
        # usually follows its connection's end within milliseconds.
        if process is not None and process.wait(_EXIT_STATUS_WAIT) is not None:
            self.plugin_exited(process)
        else:
            self._reject_all(PluginAbortedError(f"plugin {self.executable!r} closed its admission stream"))


class AdmissionsService:
    """Serves ``cipd.plugin.Admissions`` for sessions whose controller is an AdmissionPlugin."""

    def __init__(self, server: PluginServer) -> None:
        self._server = server

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "cipd.plugin.Admissions",
            {
                "ListAdmissions": method_handler(
                    grpc.unary_stream_rpc_method_handler,
                    self.list_admissions,
                    plugin_pb2.ListAdmissionsRequest,
                    plugin_pb2.Admission,
                ),
                "ResolveAdmission": method_handler(
                    grpc.unary_unary_rpc_method_handler,
                    self.resolve_admission,
                    plugin_pb2.ResolveAdmissionRequest,
                    Empty,
                ),
            },
        )

    def _plugin(self, context: grpc.ServicerContext) -> tuple[AdmissionPlugin, PluginSession]:
        session = self._server.session_for(context)
        if not isinstance(session.controller, AdmissionPlugin):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this plugin is not an admission plugin")
        return session.controller, session

    def list_admissions(
        self, request: plugin_pb2.ListAdmissionsRequest, context: grpc.ServicerContext
    ) -> Iterator[plugin_pb2.Admission]:
        plugin, session = self._plugin(context)

        def refuse() -> None:
            # The session's process is set before the handshake is written,
            # so it is there even if the plugin connects before its launch
            # has returned to the launcher thread.
            self._server.forget(session)
            if session.process is not None:
                session.process.close_stdin()

        yield from plugin.serve_admissions(request, context, refuse)

    def resolve_admission(
        self, request: plugin_pb2.ResolveAdmissionRequest, context: grpc.ServicerContext
    ) -> Empty:
        plugin, _ = self._plugin(context)
        plugin.resolve_admission(request)
        return Empty()
