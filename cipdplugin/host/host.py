"""``Host``: owns the plugin server and every plugin process it launches."""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, wait
from typing import Protocol

from cipdplugin.cmdline import checked_cmdline
from cipdplugin.config import Config
from cipdplugin.constants import CLOSE_MARGIN, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_PENDING
from cipdplugin.deadline import Deadline
from cipdplugin.errors import PluginAbortedError, PluginStartError
from cipdplugin.host.admission import AdmissionPlugin
from cipdplugin.host.admission_service import ADMISSIONS_SERVICE
from cipdplugin.host.audit import AuditLog, AuditTarget
from cipdplugin.host.host_service import HOST_SERVICE, HostServant
from cipdplugin.host.lifecycle import PluginLifecycle, PluginState, close_on_own_thread, wait_for_close
from cipdplugin.host.process import FORKS, PluginProcess, display_name, termination_span
from cipdplugin.host.transport import PluginServer, PluginSession, ServerStartError, Service


class PluginController(Protocol):
    """What ``Host.launch_plugin`` routes a plugin's calls to.

    ``services`` (optional) maps each gRPC service name the plugin may call
    to the object serving it (see ``cipdplugin.host.transport.Service``);
    every plugin may call ``cipd.plugin.Host``. A controller without
    ``services`` gives the plugin that service only.
    """


class Host:
    """Launches plugins, serves them over loopback gRPC, and stops them.

    Use as a context manager, or call ``close()``; plugins of a host that
    was never closed are terminated when the interpreter exits.

    A host belongs to the process that created it. In a child forked from
    that process, ``close()`` does nothing (the plugins are the parent's),
    launching raises ``RuntimeError``, and the exit hook leaves it alone.
    """

    #: The services of every plugin kind, registered with the transport.
    SERVICES: tuple[Service, ...] = (HOST_SERVICE, ADMISSIONS_SERVICE)

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
        self._server = PluginServer(self.SERVICES, self.logger, port=port)
        self._fork_generation = FORKS.generation
        # Guards the fields below; held only for a moment, never while calling out.
        self._lock = threading.Lock()
        self._config = config
        self._launched = False  # a plugin was launched: the config is fixed
        self._closed: Future[None] | None = None  # the close, once close() was called
        self._checks_failed: Future[None] = Future()  # the close has failed every pending check
        # The plugins of every kind made here. Weak: a running one is also
        # held by its launcher and its process's exit callback, and a dropped
        # idle one needs no close.
        self._lifecycles: weakref.WeakSet[PluginLifecycle] = weakref.WeakSet()
        self._processes: set[PluginProcess] = set()  # launched by launch_plugin, for no lifecycle
        _live_hosts.add(self)

    @property
    def config(self) -> Config | None:
        return self._config

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has been called (it may still be running)."""
        return self._closed is not None

    @property
    def port(self) -> int:
        """The loopback port plugins connect to; 0 until the first launch."""
        return self._server.port

    @property
    def server(self) -> PluginServer:
        """The gRPC server plugins call."""
        return self._server

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
            if self._closed is not None:
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
        being queued (or of the plugin connecting, if later) fails with
        ``AdmissionError`` DEADLINE_EXCEEDED, and a late answer is ignored
        (None: no limit).

        Raises:
            ValueError: ``cmdline`` is not a non-empty list of strings,
                ``connect_timeout`` or ``check_timeout`` is not finite and
                positive, or ``max_pending`` is below 1.
            TypeError: ``connect_timeout`` or ``check_timeout`` is not a
                number, or ``max_pending`` is not an int.
            RuntimeError: the host is closed, or belongs to a parent process.
        """
        cmdline = list(checked_cmdline(cmdline))
        self._check_owner()
        plugin = AdmissionPlugin(
            self,
            cmdline,
            connect_timeout=connect_timeout,
            max_pending=max_pending,
            check_timeout=check_timeout,
        )
        with self._lock:
            if self._closed is not None:
                raise RuntimeError("the host is closed")
            self._lifecycles.add(plugin.lifecycle)
        return plugin

    def launch_plugin(self, cmdline: Sequence[str], controller: PluginController) -> PluginProcess:
        """Start a plugin process and hand it its handshake.

        The server starts with the first launch, while the process boots.
        The plugin's calls go to ``controller.services`` (see
        ``PluginController``). The process is terminated by ``close()``.

        Raises:
            PluginStartError: the executable cannot be started, the server
                cannot start, or the host is closed.
            RuntimeError: the host belongs to a parent process.
        """
        process, _ = self._launch(cmdline, getattr(controller, "services", {}), owned=False)
        return process

    def launch_session(
        self, cmdline: Sequence[str], services: Mapping[str, object]
    ) -> tuple[PluginProcess, PluginSession]:
        """``launch_plugin`` for a plugin kind's lifecycle, which terminates
        the process itself: the process and the transport's session."""
        return self._launch(cmdline, services, owned=True)

    def forget_session(self, session: PluginSession) -> None:
        """Forget a plugin's ticket: its later calls get PERMISSION_DENIED."""
        self._server.forget(session)

    def _launch(
        self, cmdline: Sequence[str], services: Mapping[str, object], *, owned: bool
    ) -> tuple[PluginProcess, PluginSession]:
        cmdline = list(checked_cmdline(cmdline))
        self._check_owner()
        name = display_name(cmdline)
        with self._lock:
            if self._closed is not None:
                raise PluginStartError(f"cannot start plugin {name!r}: the host is closed")
            self._launched = True
        # Launched outside the lock (Popen may take a while); registered, or
        # terminated if close() began meanwhile, under it.
        process = PluginProcess(cmdline, logger=self.logger)
        with self._lock:
            refused = self._closed is not None
            if not refused and not owned:
                self._processes.add(process)
        if refused:
            process.terminate()
            raise PluginStartError(f"cannot start plugin {name!r}: the host is closed")
        servants = {HOST_SERVICE.name: HostServant(name, lambda: self._config, self.logger), **services}
        session = self._server.new_session(name, servants)
        session.process = process
        process.exited.add_done_callback(lambda _: self._server.forget(session))
        try:
            port = self._server.start()
        except ServerStartError as exc:
            process.terminate()
            raise PluginStartError(f"cannot start plugin {name!r}: {exc}") from None
        if not process.exited.done():
            self._server.register(session)
        handshake = json.dumps({"port": port, "ticket": session.ticket}, separators=(",", ":"))
        process.write_line(handshake.encode("ascii") + b"\n")
        return process, session

    def close(self, timeout: float | None = None) -> None:
        """Terminate every plugin in parallel and stop the server. Idempotent.

        Pending checks fail with ``PluginAbortedError`` (their callbacks run
        on the closing thread). Plugins get their stdin closed, SIGTERM after
        a grace period, and SIGKILL at the kill deadline: 5 s, or ``timeout``
        if shorter. Returns within that deadline plus ``CLOSE_MARGIN`` (0.5 s),
        with the audit log written and flushed. The close runs on a thread
        of its own, so it is safe from a signal handler; a second call waits
        for the first, unless it comes from the closing thread itself (a
        Future callback that closes the host): then it returns at once. Called
        on one of the server's threads (a Future callback run by a plugin's
        answer), it returns once pending checks have failed: the rest of the
        close waits for that very call to end. In a child process forked from
        the host's, does nothing.
        """
        if self._fork_generation != FORKS.generation:
            return
        with self._lock:
            closed = self._closed
            if closed is None:
                self._closed = closed = Future()
                first = True
            else:
                first = False
        deadline = Deadline(termination_span(timeout))
        # A call being served (a Future callback on the server's pool) must not
        # wait for the whole close, which waits for the server's calls to
        # end, this one included: it waits only for the checks to fail.
        in_a_call = self._server.serves_on_this_thread()
        if first:
            done = close_on_own_thread(
                self._close_all, timeout=timeout, name="cipdplugin-host-close", wait=not in_a_call
            )
            done.add_done_callback(lambda _: closed.set_result(None))
        elif not in_a_call:
            wait_for_close(closed, deadline)
        if in_a_call:
            wait([self._checks_failed], deadline.remaining())

    def _close_all(self, deadline: Deadline) -> None:
        """The close itself, on the closing thread: one deadline for everything."""
        assert deadline.moment is not None
        # The closer's own end comes a moment before its callers stop
        # waiting for it, so that what it reports is reported by then.
        final = Deadline.at(deadline.moment + 0.9 * CLOSE_MARGIN)
        try:
            with self._lock:
                lifecycles, processes = list(self._lifecycles), list(self._processes)
            # First, on this thread: pending checks fail at once.
            for lifecycle in lifecycles:
                lifecycle.end(PluginAbortedError(f"plugin {lifecycle.name!r} was closed"), PluginState.CLOSED)
            self._checks_failed.set_result(None)
            stoppers = [
                threading.Thread(
                    target=lifecycle.close, args=(deadline,), name="cipdplugin-stopper", daemon=True
                )
                for lifecycle in lifecycles
            ]
            stoppers += [
                threading.Thread(
                    target=process.terminate,
                    kwargs={"deadline": deadline},
                    name="cipdplugin-stopper",
                    daemon=True,
                )
                for process in processes
            ]
            for thread in stoppers:
                thread.start()
            # The server serves the plugins while they leave (a plugin's last
            # log records come then), and stops once they are gone.
            for thread in stoppers:
                thread.join(final.remaining())
            self._server.stop(final)
        finally:
            if not self._checks_failed.done():
                self._checks_failed.set_result(None)  # nobody waits for it in vain
            if self._audit_log is not None:
                # Last: closing the plugins settled their pending checks.
                self._audit_log.close(final.remaining())
            _live_hosts.discard(self)

    def _check_owner(self) -> None:
        if self._fork_generation != FORKS.generation:
            raise RuntimeError(
                "a Host can only be used in the process that created it, not in a forked child"
            )


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
