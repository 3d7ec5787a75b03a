"""``Host``: owns the plugin server and every plugin process it launches."""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (see the exit hook at the end)
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Protocol

from cipdplugin.config import Config
from cipdplugin.errors import PluginStartError
from cipdplugin.host.admission import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_PENDING,
    AdmissionPlugin,
    AdmissionsService,
)
from cipdplugin.host.process import PluginProcess, termination_span
from cipdplugin.host.server import PluginServer, PluginSession, ServerStartError
from cipdplugin.host.services import HostService

#: Added to a close() deadline for the server's own shutdown.
_SERVER_STOP = 1.0


class PluginController(Protocol):
    """What a plugin kind gives ``Host.launch_plugin``.

    ``plugin_exited`` is called once, from the process's monitor thread,
    after the process has exited and been reaped.
    """

    def plugin_exited(self, process: PluginProcess) -> None: ...


class Host:
    """Launches plugins, serves them over loopback gRPC, and stops them.

    Use as a context manager, or call ``close()``; plugins of a host that
    was never closed are terminated when the interpreter exits.
    """

    def __init__(self, config: Config | None = None, *, logger: logging.Logger | None = None, port: int = 0):
        """Create a host; nothing starts until the first plugin is launched.

        Args:
            config: the backend URL and metadata source; may come later
                through ``initialize``.
            logger: where plugin logs and output go (default: ``cipdplugin``).
            port: the loopback port to listen on (default: one the OS picks).
        """
        self.logger = logger or logging.getLogger("cipdplugin")
        self._server = PluginServer(port=port)
        self._server.add_handlers(
            [
                HostService(self._server, lambda: self._config, self.logger).handler(),
                AdmissionsService(self._server).handler(),
            ]
        )
        # Guards the fields below.
        self._lock = threading.Lock()
        self._config = config
        self._launched = False  # a plugin was launched: the config is fixed
        self._closing = False
        self._closed = threading.Event()
        # Admission plugins made here. Weak: a running one is also held by
        # its process's exit callback, and a dropped idle one needs no close.
        self._plugins: weakref.WeakSet[AdmissionPlugin] = weakref.WeakSet()
        self._processes: set[PluginProcess] = set()  # running processes of any kind
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
    ) -> AdmissionPlugin:
        """An admission plugin for ``cmdline``; it starts on its first check.

        Raises:
            ValueError: ``cmdline`` is not a non-empty list of strings, or a
                limit is out of range.
            RuntimeError: the host is closed.
        """
        cmdline = _checked_cmdline(cmdline)
        plugin = AdmissionPlugin(self, cmdline, connect_timeout=connect_timeout, max_pending=max_pending)
        with self._lock:
            if self._closing:
                raise RuntimeError("the host is closed")
            self._plugins.add(plugin)
        return plugin

    def launch_plugin(self, cmdline: Sequence[str], controller: PluginController) -> PluginProcess:
        """Start a plugin process and hand it its handshake.

        The server starts with the first launch, while the process boots.

        Raises:
            PluginStartError: the executable cannot be started, the server
                cannot start, or the host is closed.
        """
        cmdline = _checked_cmdline(cmdline)
        session = PluginSession(name=os.path.basename(cmdline[0]), controller=controller)
        # The controller hears of the exit only once the launch has
        # succeeded: a launch that fails raises instead. The process may exit
        # on either side of that moment, so whichever comes second notifies.
        handover_lock = threading.Lock()
        handover = {"launched": False, "exited": False}

        def exited(process: PluginProcess) -> None:
            self._server.forget(session)
            with self._lock:
                self._processes.discard(process)
            with handover_lock:
                handover["exited"] = True
                notify = handover["launched"]
            if notify:
                controller.plugin_exited(process)

        with self._lock:
            if self._closing:
                raise PluginStartError(f"cannot start plugin {cmdline[0]!r}: the host is closed")
            self._launched = True
            # Started under the lock so that close() sees every process.
            process = PluginProcess(cmdline, logger=self.logger, on_exit=exited)
            self._processes.add(process)
        session.process = process
        try:
            port = self._server.start()
        except ServerStartError as exc:
            process.terminate()
            raise PluginStartError(f"cannot start plugin {cmdline[0]!r}: {exc}") from None
        self._server.register(session)
        handshake = json.dumps({"port": port, "ticket": session.ticket}, separators=(",", ":"))
        process.write_line(handshake.encode("ascii") + b"\n")
        with handover_lock:
            handover["launched"] = True
            notify = handover["exited"]
        if notify:
            controller.plugin_exited(process)
        return process

    def close(self, timeout: float | None = None) -> None:
        """Terminate every plugin in parallel and stop the server. Idempotent.

        Pending checks fail with ``PluginAbortedError``. Returns within the
        termination deadline (5 s, or ``timeout`` if shorter) plus a small
        constant; a concurrent second call waits for the first.
        """
        span = termination_span(timeout)
        deadline = time.monotonic() + span
        with self._lock:
            first = not self._closing
            self._closing = True
            plugins, processes = list(self._plugins), list(self._processes)
        if not first:
            self._closed.wait(span + _SERVER_STOP)
            return
        try:
            stoppers = [threading.Thread(target=p.close, args=(span,), daemon=True) for p in plugins]
            stoppers += [threading.Thread(target=p.terminate, args=(span,), daemon=True) for p in processes]
            for thread in stoppers:
                thread.start()
            for thread in stoppers:
                # terminate() bounds itself by the deadline; the margin covers
                # the SIGKILL settling time.
                thread.join(max(0.0, deadline - time.monotonic()) + _SERVER_STOP)
            self._server.stop(_SERVER_STOP)
        finally:
            _live_hosts.discard(self)
            self._closed.set()


def _checked_cmdline(cmdline: Sequence[str]) -> list[str]:
    if isinstance(cmdline, (str, bytes)) or not isinstance(cmdline, Sequence):
        raise ValueError(f"a plugin command line must be a list of strings, got {cmdline!r}")
    if not cmdline or not all(isinstance(arg, str) for arg in cmdline) or not cmdline[0]:
        raise ValueError(f"a plugin command line must be a non-empty list of strings, got {cmdline!r}")
    return list(cmdline)


# Hosts not yet closed; the interpreter-exit hook closes them.
_live_hosts: weakref.WeakSet[Host] = weakref.WeakSet()


def _close_live_hosts() -> None:
    for host in list(_live_hosts):
        host.close()


# threading's exit hooks run before non-daemon threads are joined, in reverse
# order of registration. The thread pool module registers a hook that joins
# its workers, and a server worker may be blocked in a plugin's stream until
# the host closes: so that module is imported first (it registers lazily
# otherwise), making our hook run before its hook. Plain atexit is the
# fallback where the hook is missing.
_register_exit_hook = getattr(threading, "_register_atexit", atexit.register)
_register_exit_hook(_close_live_hosts)
