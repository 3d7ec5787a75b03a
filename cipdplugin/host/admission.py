"""``AdmissionPlugin``: the admission kind of plugin, as callers see it.

It builds on the generic ``PluginLifecycle`` (launch, connect, exit, end,
close) and adds what is particular to admissions: checks queued, cached and
settled (``AdmissionChecks``), their deadlines, and the Admissions service
the plugin calls (``AdmissionsServant``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import grpc

from cipdplugin.constants import DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_PENDING, MAX_MESSAGE_BYTES
from cipdplugin.deadline import Deadline, checked_timeout
from cipdplugin.errors import AdmissionError
from cipdplugin.host.admission_service import ADMISSIONS_SERVICE, AdmissionsServant
from cipdplugin.host.checks import AdmissionChecks, Check, admission_id
from cipdplugin.host.deadlines import checked_check_timeout
from cipdplugin.host.lifecycle import PluginLifecycle, PluginState, close_on_own_thread
from cipdplugin.pins import Pin
from cipdplugin.protocol import plugin_pb2

if TYPE_CHECKING:
    from cipdplugin.host.host import Host
    from cipdplugin.host.process import PluginProcess

#: Below this many bytes of strings an Admission cannot reach MAX_MESSAGE_BYTES,
#: so its size is not computed (the ID, digest and field tags stay under 1 KiB).
_SIZE_CHECK_FLOOR = MAX_MESSAGE_BYTES - 1024
_NO_DEADLINE = Deadline(None)


class AdmissionPlugin:
    """One admission plugin subprocess, asked about pins through promises.

    Created by ``Host.new_admission_plugin``; nothing runs until the first
    ``check_admission``. Thread-safe. A context manager: ``__exit__`` closes it.
    """

    def __init__(
        self,
        host: Host,
        cmdline: Sequence[str],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
        check_timeout: float | None = None,
    ) -> None:
        """See ``Host.new_admission_plugin``.

        Raises:
            TypeError: ``connect_timeout`` or ``check_timeout`` is not a
                number, or ``max_pending`` not an int.
            ValueError: ``connect_timeout`` or ``check_timeout`` is not finite
                and positive, or ``max_pending`` is below 1.
        """
        connect_timeout = checked_timeout(connect_timeout, "connect_timeout")
        self._check_timeout = checked_check_timeout(check_timeout)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int):
            raise TypeError(f"max_pending must be an int, got {max_pending!r}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        self._host = host
        self._salt = str(os.getpid()).encode()
        self._url_bytes = len(host.service_url.encode())
        self._lifecycle = PluginLifecycle(
            host,
            cmdline,
            connect_timeout=connect_timeout,
            services={},
            on_ended=self._ended,
            on_closed=self._join_threads,
            work="checks",
        )
        self._audit = host.audit_log
        self._checks = AdmissionChecks(
            name=self._lifecycle.name,
            max_pending=max_pending,
            check_timeout=self._check_timeout,
            on_settling=None if self._audit is None else self._record,
        )
        self._lifecycle.services[ADMISSIONS_SERVICE.name] = AdmissionsServant(self._lifecycle, self._checks)

    @property
    def executable(self) -> str:
        """The plugin's executable, ``cmdline[0]``."""
        return self._lifecycle.cmdline[0]

    @property
    def name(self) -> str:
        """The name messages and logs give the plugin (its script, under an interpreter)."""
        return self._lifecycle.name

    @property
    def state(self) -> PluginState:
        return self._lifecycle.state

    @property
    def process(self) -> PluginProcess | None:
        """The plugin's process once launched, else None."""
        return self._lifecycle.process

    @property
    def host(self) -> Host:
        """The host this plugin belongs to."""
        return self._host

    @property
    def plugin_version(self) -> str:
        """The version the plugin reported in ListAdmissions; "" until it connected."""
        return self._lifecycle.version

    @property
    def check_timeout(self) -> float | None:
        """Seconds a check may wait for its answer once queued and the plugin connected; None: no limit."""
        return self._check_timeout

    @property
    def lifecycle(self) -> PluginLifecycle:
        """The plugin's life, as the host drives it."""
        return self._lifecycle

    def __repr__(self) -> str:
        return f"<AdmissionPlugin {self.name!r} {self.state.value}>"

    def __enter__(self) -> AdmissionPlugin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def check_admission(self, pin: Pin | str, *, timeout: float | None = None) -> Future[None]:
        """Ask the plugin whether ``pin`` may be deployed.

        Returns a Future that resolves to None if admitted, or holds
        ``AdmissionDenied``, ``AdmissionError``, ``PluginStartError`` or
        ``PluginAbortedError``. The same pin gets the same Future until
        ``clear_cache()``; only the host settles it. The first call starts
        the plugin in the background. Blocks only while ``max_pending``
        checks wait to be sent, until there is room, the plugin breaks or
        closes, or ``timeout`` passes.

        A pin whose request would exceed the 4 MiB message limit of plugins
        gets a failed Future (INVALID_ARGUMENT) and is never sent.

        Raises:
            InvalidPinError: ``pin`` is a malformed ``"package:instance_id"`` string.
            TimeoutError: the queue had no room within ``timeout`` seconds.
            RuntimeError: called in a child process forked from the host's.
        """
        if not isinstance(pin, Pin):
            pin = Pin.parse(pin)
        future = self._checks.cached(pin)
        if future is not None:
            return future
        if not self._lifecycle.owned_here():
            raise RuntimeError("an admission plugin can only be used in the process that created its host")
        deadline = (
            _NO_DEADLINE
            if timeout is None
            else Deadline(checked_timeout(timeout, "timeout", allow_zero=True))
        )
        admission = plugin_pb2.Admission(
            service_url=self._host.service_url, package=pin.package, instance=pin.object_ref
        )
        admission.admission_id = admission_id(admission, self._salt)
        if (
            len(pin.package) + self._url_bytes > _SIZE_CHECK_FLOOR
            and admission.ByteSize() > MAX_MESSAGE_BYTES
        ):
            return self._checks.refuse(
                pin,
                AdmissionError(
                    f"the check of {pin.package!r} is {admission.ByteSize()} bytes, over the "
                    f"{MAX_MESSAGE_BYTES}-byte message limit of plugins; it was not sent",
                    code=grpc.StatusCode.INVALID_ARGUMENT,
                ),
            )
        try:
            future = self._checks.add(pin, admission, deadline)
        except TimeoutError:
            raise TimeoutError(
                f"plugin {self.name!r} had no room for the check within {timeout:g} s"
            ) from None
        if self._lifecycle.state is PluginState.NOT_STARTED:
            self._lifecycle.start()
        return future

    def clear_cache(self) -> None:
        """Forget resolved promises; pending ones stay shared."""
        self._checks.clear_cache()

    def close(self, timeout: float | None = None) -> None:
        """Fail pending checks with ``PluginAbortedError`` and terminate the plugin.

        Later checks fail at once the same way. Idempotent; safe while the
        plugin is still starting, and from a signal handler. Returns within
        the termination deadline (5 s, or ``timeout`` if shorter) plus
        ``CLOSE_MARGIN``. The work runs on a thread of its own; called from
        a thread that is itself closing (a Future callback of a close), it
        starts the close and returns at once.
        """
        close_on_own_thread(self._lifecycle.close, timeout=timeout, name=f"cipdplugin-close-{self.name}")

    # -- Called by the lifecycle and the checks -------------------------------------------

    def _ended(self, error: AdmissionError, state: PluginState) -> None:
        """The plugin ended: fail its checks (and tell later ones why)."""
        later = error
        if state is PluginState.BROKEN:
            later = type(error)(
                f"{error.message}; the plugin stays stopped, and checks made since fail at once "
                "(make a new plugin with Host.new_admission_plugin to try again)",
                code=error.code,
            )
        self._checks.fail_all(error, later)

    def _join_threads(self, deadline: Deadline) -> None:
        deadlines = self._checks.deadlines
        if deadlines is not None:
            deadlines.join(deadline.remaining())

    def _record(self, check: Check, outcome: BaseException | None) -> None:
        assert self._audit is not None
        self._audit.record_check(
            check.pin,
            outcome,
            plugin=self.name,
            plugin_version=self._lifecycle.version,
            service_url=self._host.service_url,
            enqueued=check.queued_at,
        )
