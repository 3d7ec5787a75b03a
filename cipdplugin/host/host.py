"""``Host``: owns the plugin server and every plugin process it launches."""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

from cipdplugin.config import Config
from cipdplugin.constants import AUDIT_FLUSH, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_PENDING, SERVER_STOP
from cipdplugin.deadline import Deadline
from cipdplugin.errors import PluginStartError
from cipdplugin.host.admission import AdmissionPlugin
from cipdplugin.host.audit import AuditLog, AuditTarget
from cipdplugin.host.process import FORKS, PluginProcess, display_name, termination_span
from cipdplugin.host.transport import PluginServer, PluginSession, ServerStartError


class PluginController(Protocol):
    """What a plugin kind gives ``Host.launch_plugin``: the object the
    transport routes the plugin's calls to (each service checks its type).
    It learns of the process's exit through ``PluginProcess.exited``."""


class Host:
    """Launches plugins, serves them over loopback gRPC, and stops them.

    Use as a context manager, or call ``close()``; plugins of a host that
    was never closed are terminated when the interpreter exits.

    A host belongs to the process that created it. In a child forked from
    that process, ``close()`` does nothing (the plugins are the parent's),
    launching raises ``RuntimeError``, and the exit hook leaves it alone.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        logger: logging.Logger | None = None,
        port: int = 0,
        audit_log: AuditTarget | None = None,
        enforce: bool = True,
    ):
        """Create a host; nothing starts until the first plugin is launched.

        Args:
            config: the backend URL and metadata source; may come later
                through ``initialize``.
            logger: where plugin logs and output go (default: ``cipdplugin``).
            port: the loopback port to listen on (default: one the OS picks).
            audit_log: where each resolved check is recorded as one JSON
                line: a path (opened in append mode), a text stream, or a
                callable receiving each record as a dict (see
                ``cipdplugin.host.audit``). Complete and flushed when
                ``close()`` returns.
            enforce: recorded as ``enforced`` in the audit log, and nothing
                else: verdicts stay as they are. False for callers that
                only warn about denials.

        Raises:
            OSError: ``audit_log`` is a path that cannot be opened.
            TypeError: ``audit_log`` is none of a path, a stream or a callable.
        """
        self.logger = logger or logging.getLogger("cipdplugin")
        self._audit_log = (
            None if audit_log is None else AuditLog(audit_log, enforced=enforce, logger=self.logger)
        )
        self._enforce = bool(enforce)
        self._server = PluginServer(lambda: self._config, self.logger, port=port)
        self._fork_generation = FORKS.generation
        # Guards the fields below. Re-entrant: close() may run in a signal
        # handler that interrupted this thread inside the lock.
        self._lock = threading.RLock()
        self._config = config
        self._launched = False  # a plugin was launched: the config is fixed
        self._closing = False  # close() was called
        self._close_threads: set[int] = set()  # the first close()'s thread and its stoppers
        # Admission plugins made here. Weak: a running one is also held by
        # its process's exit callback, and a dropped idle one needs no close.
        self._plugins: weakref.WeakSet[AdmissionPlugin] = weakref.WeakSet()
        self._processes: set[PluginProcess] = set()  # running processes of any kind
        self._close_finished = threading.Event()  # the first close() has returned
        _live_hosts.add(self)

    @property
    def config(self) -> Config | None:
        return self._config

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has been called (it may still be running)."""
        return self._closing

    @property
    def port(self) -> int:
        """The loopback port plugins connect to; 0 until the first launch."""
        return self._server.port

    @property
    def audit_log(self) -> AuditLog | None:
        """The audit log checks are recorded in, if any."""
        return self._audit_log

    @property
    def enforce(self) -> bool:
        """Whether verdicts are enforced, as the audit log records it."""
        return self._enforce

    @property
    def service_url(self) -> str:
        config = self._config
        return config.service_url if config is not None else ""

    def initialize(self, config: Config) -> None:
        """Set the config; only before any plugin is launched.

        Raises:
            RuntimeError: a plugin was already launched, or the host is closed.
        """
        with self._lock:
            if self._closing:
                raise RuntimeError("the host is closed")
            if self._launched:
                raise RuntimeError("Host.initialize must be called before any plugin is launched")
            self._config = config

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def new_admission_plugin(
        self,
        cmdline: Sequence[str],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
        check_timeout: float | None = None,
    ) -> AdmissionPlugin:
        """An admission plugin for ``cmdline``; it starts on its first check.

        ``check_timeout``: a check not answered within that many seconds of
        being sent to the plugin fails with ``AdmissionError``
        DEADLINE_EXCEEDED, and a late answer is ignored (None: no limit).

        Raises:
            ValueError: ``cmdline`` is not a non-empty list of strings,
                ``connect_timeout`` or ``check_timeout`` is not finite and
                positive, or ``max_pending`` is below 1.
            TypeError: ``connect_timeout`` or ``check_timeout`` is not a
                number, or ``max_pending`` is not an int.
            RuntimeError: the host is closed, or belongs to a parent process.
        """
        cmdline = _checked_cmdline(cmdline)
        self._check_owner()
        plugin = AdmissionPlugin(
            self,
            cmdline,
            connect_timeout=connect_timeout,
            max_pending=max_pending,
            check_timeout=check_timeout,
        )
        with self._lock:
            if self._closing:
                raise RuntimeError("the host is closed")
            self._plugins.add(plugin)
        return plugin

    def launch_plugin(self, cmdline: Sequence[str], controller: PluginController) -> PluginProcess:
        """Start a plugin process and hand it its handshake.

        The server starts with the first launch, while the process boots.
        ``controller`` is what the plugin's calls are routed to.

        Raises:
            PluginStartError: the executable cannot be started, the server
                cannot start, or the host is closed.
            RuntimeError: the host belongs to a parent process.
        """
        cmdline = _checked_cmdline(cmdline)
        self._check_owner()
        name = display_name(cmdline)
        with self._lock:
            if self._closing:
                raise PluginStartError(f"cannot start plugin {name!r}: the host is closed")
            self._launched = True
        # Launched outside the lock (Popen may take a while); registered, or
        # terminated if close() began meanwhile, under it.
        process = PluginProcess(cmdline, logger=self.logger)
        with self._lock:
            refused = self._closing
            if not refused:
                self._processes.add(process)
        if refused:
            process.terminate()
            raise PluginStartError(f"cannot start plugin {name!r}: the host is closed")
        session = PluginSession(name=name, controller=controller, process=process)

        def forget(_: object) -> None:
            self._server.forget(session)
            with self._lock:
                self._processes.discard(process)

        process.exited.add_done_callback(forget)
        try:
            port = self._server.start()
        except ServerStartError as exc:
            process.terminate()
            raise PluginStartError(f"cannot start plugin {name!r}: {exc}") from None
        if not process.exited.done():
            self._server.register(session)
        handshake = json.dumps({"port": port, "ticket": session.ticket}, separators=(",", ":"))
        process.write_line(handshake.encode("ascii") + b"\n")
        return process

    def close(self, timeout: float | None = None) -> None:
        """Terminate every plugin in parallel and stop the server. Idempotent.

        Pending checks fail with ``PluginAbortedError``, on this thread.
        Returns within the termination deadline (5 s, or ``timeout`` if
        shorter) plus a small constant. A concurrent second call waits for
        the first, unless it comes from the first itself (a Future callback
        that closes the host): then it returns at once. Safe from a signal
        handler. In a child process forked from the host's, does nothing.
        """
        if self._fork_generation != FORKS.generation:
            return
        span = termination_span(timeout)
        deadline = Deadline(span)
        with self._lock:
            first = not self._closing
            nested = threading.get_ident() in self._close_threads
            self._closing = True
            self._close_threads.add(threading.get_ident())
            plugins, processes = list(self._plugins), list(self._processes)
        if not first:
            if not nested:
                self._close_finished.wait(span + SERVER_STOP)
            return
        try:
            for plugin in plugins:
                plugin.begin_close()
            stoppers = [self._stopper(plugin.close, span) for plugin in plugins]
            stoppers += [self._stopper(process.terminate, span) for process in processes]
            for thread in stoppers:
                thread.start()
            for thread in stoppers:
                # Each stopper bounds itself by the deadline; the margin
                # covers the SIGKILL settling time.
                thread.join(deadline.remaining_or(span) + SERVER_STOP)
            self._server.stop(SERVER_STOP)
        finally:
            if self._audit_log is not None:
                # Last: closing the plugins settled their pending checks.
                self._audit_log.close(deadline.remaining_or(span) + AUDIT_FLUSH)
            _live_hosts.discard(self)
            self._close_finished.set()

    def _stopper(self, stop: Callable[[float], object], span: float) -> threading.Thread:
        def run() -> None:
            with self._lock:
                self._close_threads.add(threading.get_ident())
            stop(span)

        return threading.Thread(target=run, name="cipdplugin-stopper", daemon=True)

    def _check_owner(self) -> None:
        if self._fork_generation != FORKS.generation:
            raise RuntimeError(
                "a Host can only be used in the process that created it, not in a forked child"
            )


def _checked_cmdline(cmdline: Sequence[str]) -> list[str]:
    if isinstance(cmdline, (str, bytes)) or not isinstance(cmdline, Sequence):
        raise ValueError(f"a plugin command line must be a list of strings, got {cmdline!r}")
    if not cmdline or not all(isinstance(arg, str) for arg in cmdline) or not cmdline[0]:
        raise ValueError(f"a plugin command line must be a non-empty list of strings, got {cmdline!r}")
    return list(cmdline)


# Hosts not yet closed; the interpreter-exit hook closes them. A forked child
# starts with none: the hosts it inherits belong to its parent.
_live_hosts: weakref.WeakSet[Host] = weakref.WeakSet()


def _close_live_hosts() -> None:
    for host in list(_live_hosts):
        host.close()


def _forget_hosts_in_child() -> None:
    _live_hosts.clear()


# Plain atexit, ordered by design: the server's threads are daemons, so
# nothing joins them before this hook runs; and grpc, imported above,
# registered its own exit hooks first, so they run after this one.
atexit.register(_close_live_hosts)
os.register_at_fork(after_in_child=_forget_hosts_in_child)
