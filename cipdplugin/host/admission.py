"""Admission plugins, host side: promises, the bounded queue, and the state
of one plugin's stream.

Nothing here speaks gRPC: ``host/transport.py`` serves the Admissions
service and calls the four methods of the stream's side (``on_connected``,
``next_admissions``, ``on_disconnected``, ``resolve``), as the Go host's
admissions server does.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from google.rpc import status_pb2

from cipdplugin.constants import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_PENDING,
    EXIT_STATUS_WAIT,
    LAUNCH_JOIN,
    MAX_MESSAGE_BYTES,
    REFUSAL_GRACE,
)
from cipdplugin.deadline import Deadline, checked_timeout
from cipdplugin.errors import (
    AdmissionDenied,
    AdmissionError,
    PluginAbortedError,
    PluginStartError,
)
from cipdplugin.host.deadlines import CheckDeadlines, checked_check_timeout
from cipdplugin.host.process import FORKS, display_name, termination_span
from cipdplugin.pins import Pin
from cipdplugin.protocol import PROTOCOL_VERSION, plugin_pb2
from cipdplugin.status import code_of

if TYPE_CHECKING:
    from cipdplugin.host.audit import AuditLog
    from cipdplugin.host.host import Host
    from cipdplugin.host.process import PluginProcess

_OK = grpc.StatusCode.OK.value[0]
_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
#: Below this many bytes of strings an Admission cannot reach MAX_MESSAGE_BYTES,
#: so its size is not computed (the ID, digest and field tags stay under 1 KiB).
_SIZE_CHECK_FLOOR = MAX_MESSAGE_BYTES - 1024
_NO_DEADLINE = Deadline(None)


class AdmissionFuture(Future[None]):
    """A shared admission promise: callers may wait on it but not cancel it."""

    #: Set on the promises of an audited plugin: told the outcome by the first
    #: call that settles the promise, just before it resolves, so a check seen
    #: resolved is already queued for the audit log.
    on_resolving: Callable[[BaseException | None], None] | None = None
    #: A settling call took ``on_resolving``: any other settling call loses.
    _claimed = False
    #: The pin this promise answers, once its plugin has cached it.
    pin: Pin | None = None

    def cancel(self) -> bool:
        return False

    def set_result(self, result: None) -> None:
        if self.on_resolving is not None or self._claimed:
            self._claim(None)
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if self.on_resolving is not None or self._claimed:
            self._claim(exception)
        super().set_exception(exception)

    def _claim(self, outcome: BaseException | None) -> None:
        """Make this call the one that settles an audited promise, and record it.

        Calls may race to settle one promise (an answer, a deadline and the
        funnel): only the first to claim it records its outcome and resolves
        it, so the record is always the outcome the promise ends with.

        Raises:
            InvalidStateError: another call claimed the promise first.
        """
        with _CLAIMS:
            hook = self.on_resolving
            if hook is None:
                raise InvalidStateError(f"{self!r} is already being settled")
            self.on_resolving = None
            self._claimed = True
        # Outside the lock: the record is queued before the promise resolves,
        # and no other settling call can resolve it meanwhile.
        try:
            hook(outcome)
        except Exception:
            # The promise must still resolve: a record is never worth a verdict.
            logging.getLogger("cipdplugin").exception("cannot record the outcome of a check")


#: Guards the claim of audited promises (``on_resolving`` and ``_claimed``).
#: Re-entrant: Host.close() may run in a signal handler that interrupted a
#: claim, and settle promises itself.
_CLAIMS = threading.RLock()


class PluginState(enum.Enum):
    NOT_STARTED = "not started"  # no check yet, no process
    STARTING = "starting"  # launching, or waiting for ListAdmissions
    CONNECTED = "connected"  # the stream is open; checks flow
    BROKEN = "broken"  # failed for good; ``_failure`` says why
    CLOSED = "closed"  # closed by the caller


_ALIVE = (PluginState.NOT_STARTED, PluginState.STARTING, PluginState.CONNECTED)


@dataclass(eq=False)
class Check:
    """One check from the moment it is queued until it is settled.

    The place for whatever a check's life should record: it is created in
    ``check_admission``, stamped in ``next_admissions`` when it is sent, and
    dropped in ``resolve`` or the funnel, where its Future is settled.
    """

    __slots__ = ("admission", "future", "queued_at", "sent_at")
    admission: plugin_pb2.Admission | None  # until sent
    future: AdmissionFuture
    queued_at: float  # time.monotonic() when queued
    sent_at: float | None  # when handed to the stream, None until then


@dataclass(frozen=True)
class Refusal:
    """``on_connected``'s answer when the stream must not open.

    ``final``: the plugin is refused for good (another protocol version); the
    transport forgets its ticket and resolves ``answered`` once the answer has
    left, and the plugin's launcher closes its stdin after that.
    """

    code: grpc.StatusCode
    message: str
    final: bool = False
    answered: Future[None] = field(default_factory=Future, compare=False)


class Settled(NamedTuple):
    """What the cache keeps of a settled check: its outcome, and its promise
    for as long as anyone else holds it."""

    promise: weakref.ref[AdmissionFuture]
    outcome: BaseException | None  # None: admitted


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


def _first_of(*signals: Future[Any], timeout: float | None) -> None:
    """Wait until one of ``signals`` resolves, or ``timeout`` passes: a ``select``."""
    wait(signals, timeout, FIRST_COMPLETED)


def _settle(future: Future[None], error: BaseException | None) -> None:
    """Resolve ``future`` unless something already did (exactly once, whoever is first)."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


class AdmissionPlugin:
    """One admission plugin subprocess, asked about pins through promises.

    Created by ``Host.new_admission_plugin``; nothing runs until the first
    ``check_admission``. Thread-safe.

    Its life is told by Futures, each resolved in one place:

    * ``_launched`` (the process, or the launch's error): by the launcher thread;
    * ``_connected`` (the plugin's version string, or why it was refused):
      by ``on_connected``, on the plugin's ListAdmissions call;
    * the process's ``exited``: by the process's monitor thread;
    * ``_ended`` (the error later checks get): by ``_reject_all``, the one
      funnel every ending goes through.
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
        self._connect_timeout = checked_timeout(connect_timeout, "connect_timeout")
        self._check_timeout = checked_check_timeout(check_timeout)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int):
            raise TypeError(f"max_pending must be an int, got {max_pending!r}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        self._host = host
        self._cmdline = list(cmdline)
        self._name = display_name(self._cmdline)
        self._max_pending = max_pending
        self._salt = str(os.getpid()).encode()
        self._url_bytes = len(host.service_url.encode())
        self._logger = host.logger
        self._fork_generation = FORKS.generation

        self._launched: Future[PluginProcess] = Future()
        self._connected: Future[str] = Future()
        self._ended: Future[AdmissionError] = Future()
        self._refusal: Refusal | None = None  # set once, before _connected fails with it

        # One lock guards all fields below. Re-entrant: Host.close() may run in
        # a signal handler that interrupted this thread inside the lock, and
        # every update below is ordered so that such a close leaves nothing
        # pending. Two conditions share it so that producers and the stream
        # wake only each other's counterpart.
        self._lock = threading.RLock()
        self._has_work = threading.Condition(self._lock)  # queue non-empty, or state changed
        self._has_room = threading.Condition(self._lock)  # queue has room, or state changed
        self._state = PluginState.NOT_STARTED
        self._failure: AdmissionError | None = None  # why, once BROKEN or CLOSED
        # The cache, by pin. A settled promise moves from _promises to
        # _verdicts, which holds it weakly: a resolved Future costs over 1.5 KiB
        # (its Condition, RLock and waiter deque), its outcome a few bytes, and
        # a promise nobody holds can be rebuilt from its outcome without anyone
        # telling the difference. One that somebody holds is handed out again.
        self._promises: dict[Pin, AdmissionFuture] = {}  # pending
        self._verdicts: dict[Pin, Settled] = {}  # settled
        # One bound method for every promise's callback list, not one each.
        self._verdict_keeper = self._keep_verdict
        self._in_flight: dict[str, Check] = {}  # unsettled, by admission ID
        self._queue: deque[Check] = deque()  # not yet sent to the plugin
        self._stream_claimed = False  # ListAdmissions was called once
        self._process: PluginProcess | None = None  # once launched
        self._launcher_started = False  # the launcher thread was started

        # Deadlines of sent checks, with check_timeout. Keyed by ID and check:
        # a pin checked again after clear_cache() has the same ID, and the
        # first check's deadline must not fail the second.
        self._deadlines: CheckDeadlines[tuple[str, Check]] | None = None
        if self._check_timeout is not None:
            self._deadlines = CheckDeadlines(self._check_timeout, self._check_expired, name=self._name)

    @property
    def executable(self) -> str:
        """The plugin's executable, ``cmdline[0]``."""
        return self._cmdline[0]

    @property
    def name(self) -> str:
        """The name messages and logs give the plugin (its script, under an interpreter)."""
        return self._name

    @property
    def state(self) -> PluginState:
        return self._state

    @property
    def process(self) -> PluginProcess | None:
        """The plugin's process once launched, else None."""
        return self._process

    @property
    def host(self) -> Host:
        """The host this plugin belongs to."""
        return self._host

    @property
    def plugin_version(self) -> str:
        """The version the plugin reported in ListAdmissions; "" until it connected."""
        connected = self._connected
        if connected.done() and connected.exception(timeout=0) is None:
            return connected.result(timeout=0)
        return ""

    @property
    def check_timeout(self) -> float | None:
        """Seconds a sent check may wait for its answer; None: no limit."""
        return self._check_timeout

    def __repr__(self) -> str:
        return f"<AdmissionPlugin {self._name!r} {self._state.value}>"

    # -- The caller's side -------------------------------------------------

    def check_admission(self, pin: Pin | str, *, timeout: float | None = None) -> Future[None]:
        """Ask the plugin whether ``pin`` may be deployed.

        Returns a Future that resolves to None if admitted, or holds
        ``AdmissionDenied``, ``AdmissionError``, ``PluginStartError`` or
        ``PluginAbortedError``. The same pin gets the same Future until
        ``clear_cache()``. The first call starts the plugin in the background.
        Blocks only while ``max_pending`` checks wait to be sent, until there
        is room, the plugin breaks or closes, or ``timeout`` passes.

        A pin whose request would exceed the 4 MiB message limit of plugins
        gets a failed Future (INVALID_ARGUMENT) and is never sent.

        Raises:
            InvalidPinError: ``pin`` is a malformed ``"package:instance_id"`` string.
            TimeoutError: the queue had no room within ``timeout`` seconds.
            RuntimeError: called in a child process forked from the host's.
        """
        if not isinstance(pin, Pin):
            pin = Pin.parse(pin)
        future = self._cached(pin)
        if future is not None:
            return future
        if self._fork_generation != FORKS.generation:
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
        oversized = None
        if (
            len(pin.package) + self._url_bytes > _SIZE_CHECK_FLOOR
            and admission.ByteSize() > MAX_MESSAGE_BYTES
        ):
            oversized = AdmissionError(
                f"the check of {pin.package!r} is {admission.ByteSize()} bytes, over the "
                f"{MAX_MESSAGE_BYTES}-byte message limit of plugins; it was not sent",
                code=grpc.StatusCode.INVALID_ARGUMENT,
            )
        check = Check(admission, AdmissionFuture(), time.monotonic(), None)
        check.future.pin = pin
        check.future.add_done_callback(self._verdict_keeper)
        audit = self._host.audit_log
        if audit is not None:
            check.future.on_resolving = functools.partial(self._audit_resolution, audit, pin, check.queued_at)
        launch = False
        with self._lock:
            while True:
                cached = self._cached(pin)
                if cached is not None:
                    return cached
                if oversized or self._state not in _ALIVE or len(self._queue) < self._max_pending:
                    break
                # Cannot hang without a timeout: the stream makes room, and
                # every way the plugin can end (crash, close, connect timeout)
                # notifies.
                if not self._has_room.wait(deadline.remaining()) and deadline.expired():
                    raise TimeoutError(
                        f"plugin {self._name!r} had no room for the check within {timeout:g} s"
                    )
            if oversized is not None:
                self._promises[pin] = check.future
                failure: AdmissionError | None = oversized
            else:
                # Queued first and cached last: an asynchronous exception
                # (KeyboardInterrupt) in between leaves a queued check nobody
                # holds, never a cached Future nobody will settle.
                self._in_flight[admission.admission_id] = check
                self._queue.append(check)
                self._promises[pin] = check.future
                failure = None
                if self._state in _ALIVE:
                    self._has_work.notify()
                    if self._state is PluginState.NOT_STARTED:
                        self._state = PluginState.STARTING
                        launch = True
                else:
                    # Ended before, or during this update (a signal handler on
                    # this thread may have closed the plugin): take it back.
                    self._in_flight.pop(admission.admission_id, None)
                    self._queue.clear()
                    failure = self._failure
        if failure is not None:
            _settle(check.future, failure)
        elif launch:
            self._start_launcher()
        return check.future

    def _audit_resolution(
        self, audit: AuditLog, pin: Pin, queued_at: float, outcome: BaseException | None
    ) -> None:
        audit.record_check(
            pin,
            outcome,
            plugin=self._name,
            plugin_version=self.plugin_version,
            service_url=self._host.service_url,
            enqueued=queued_at,
        )

    def clear_cache(self) -> None:
        """Forget resolved promises; pending ones stay shared."""
        with self._lock:
            # list(): one C call, which a signal handler settling promises
            # (and so moving them to _verdicts) cannot interrupt.
            self._promises = {pin: f for pin, f in list(self._promises.items()) if not f.done()}
            self._verdicts = {}
            # A dict keeps the table of its largest size; a copy of the few
            # checks still in flight gives a burst's table back.
            self._in_flight = dict(self._in_flight)

    def _cached(self, pin: Pin) -> AdmissionFuture | None:
        """The promise cached for ``pin``, or None; takes no lock on a hit."""
        # Single dict lookups and weakref calls are atomic.
        future = self._promises.get(pin)
        if future is not None:
            return future
        verdict = self._verdicts.get(pin)
        if verdict is None:
            return None
        future = verdict.promise()
        if future is not None:
            return future
        with self._lock:
            # Under the lock, so that two callers rebuilding at once get the
            # same promise.
            verdict = self._verdicts.get(pin)
            if verdict is None:
                return self._promises.get(pin)
            future = verdict.promise()
            if future is None:
                future = AdmissionFuture()
                # A fresh promise runs no callback and records no audit line
                # as it resolves: safe under the lock, and a cache hit.
                _settle(future, verdict.outcome)
                self._verdicts[pin] = Settled(weakref.ref(future), verdict.outcome)
            return future

    def _keep_verdict(self, future: Future[None]) -> None:
        """A cached promise settled: move it from the pending to the settled cache."""
        assert isinstance(future, AdmissionFuture) and future.pin is not None
        pin = future.pin
        with self._lock:
            if self._promises.get(pin) is future:
                del self._promises[pin]
                self._verdicts[pin] = Settled(weakref.ref(future), future.exception(timeout=0))

    def begin_close(self) -> None:
        """The part of ``close()`` that never waits: fail pending checks at once.

        ``Host.close()`` calls it on its own thread before terminating
        processes in parallel, so that Future callbacks run there.
        """
        self._reject_all(PluginAbortedError(f"plugin {self._name!r} was closed"), PluginState.CLOSED)

    def close(self, timeout: float | None = None) -> None:
        """Fail pending checks with ``PluginAbortedError`` and terminate the plugin.

        Later checks fail at once the same way. Idempotent; safe while the
        plugin is still starting. Returns within the termination deadline
        (5 s, or ``timeout`` if shorter) plus a small constant.
        """
        deadline = Deadline(termination_span(timeout))
        self.begin_close()
        if self._fork_generation != FORKS.generation:
            return  # the process belongs to the parent
        if self._launcher_started:
            # Wait for a launch in progress, within bounds: its launcher
            # terminates a process that comes after this close gave up.
            _first_of(self._launched, timeout=deadline.remaining_or(LAUNCH_JOIN))
        if self._deadlines is not None:
            self._deadlines.join(deadline.remaining())
        process = self._process
        if process is not None:
            process.terminate(deadline.remaining())

    # -- The single funnel every ending goes through -------------------------

    def _reject_all(self, error: AdmissionError, state: PluginState = PluginState.BROKEN) -> bool:
        """Fail every unsettled check with ``error`` and leave the alive states.

        The first ending decides the error later checks get; a close after a
        break only records that the plugin is closed. Every cached Future
        still pending is failed too, so none is left behind by a check that
        an exception interrupted. Returns whether this call ended the plugin.
        """
        if self._state is PluginState.CLOSED:
            return False  # without the lock: a closed plugin stays closed
        with self._lock:
            if self._state not in _ALIVE:
                if state is PluginState.CLOSED:
                    self._state = PluginState.CLOSED
                return False
            self._state = state
            self._failure = error
            rejected = [check.future for check in self._in_flight.values()]
            rejected += [future for future in list(self._promises.values()) if not future.done()]
            self._in_flight.clear()
            self._queue.clear()
            self._has_work.notify_all()
            self._has_room.notify_all()
        if self._deadlines is not None:
            self._deadlines.stop()
        # Outside the lock: Future callbacks run arbitrary code.
        if not self._ended.done():
            self._ended.set_result(error)
        for future in rejected:
            _settle(future, error)
        if state is PluginState.BROKEN:
            self._logger.warning("Plugin '%s': %s", self._name, error.message)
        return True

    # -- The launcher thread -------------------------------------------------

    def _start_launcher(self) -> None:
        thread = threading.Thread(
            target=self._launch_and_await, name=f"cipdplugin-launch-{self._name}", daemon=True
        )
        self._launcher_started = True
        try:
            thread.start()
        except BaseException:
            # Nothing launches this plugin now; the next check will.
            with self._lock:
                self._launcher_started = False
                if self._state is PluginState.STARTING:
                    self._state = PluginState.NOT_STARTED
            raise

    def _launch_and_await(self) -> None:
        """Launch the plugin, then wait for its connection, its exit or its end.

        The Go host's ``select`` over the same three: whichever comes first
        decides, and a timeout fails the plugin.
        """
        try:
            process = self._host.launch_plugin(self._cmdline, self)
        except PluginStartError as exc:
            self._launched.set_exception(exc)
            # Host.close() races with this launch: it refuses the launch before
            # its thread gets to close this plugin. That is a close, not a
            # failure to start, and pending checks must say so.
            if self._host.closed:
                self._reject_all(PluginAbortedError(f"plugin {self._name!r} was closed"), PluginState.CLOSED)
            else:
                self._reject_all(exc)
            return
        except Exception as exc:
            error = PluginStartError(f"cannot start plugin {self.executable!r}: {exc}")
            self._launched.set_exception(error)
            self._reject_all(error)
            return
        self._process = process
        self._launched.set_result(process)
        process.exited.add_done_callback(self._on_exit)
        _first_of(
            self._connected, process.exited, self._ended, timeout=Deadline(self._connect_timeout).remaining()
        )
        refusal = self._refusal
        if refusal is not None:
            # Answer first, stdin after: a plugin that leaves on stdin EOF
            # must still learn why it was refused.
            _first_of(refusal.answered, process.exited, timeout=REFUSAL_GRACE)
            _first_of(process.exited, timeout=REFUSAL_GRACE)
            process.close_stdin()
        elif not (self._connected.done() or process.exited.done() or self._ended.done()):
            self._reject_all(
                PluginStartError(
                    f"plugin {self._name!r} did not connect within {self._connect_timeout:g} s",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            )
            process.terminate()
        elif self._state is PluginState.CLOSED:
            # close() may have given up waiting for this launch; make sure
            # the process does not outlive the plugin.
            process.terminate()

    def _on_exit(self, exited: Future[int]) -> None:
        """The process ended: fail whatever it left unsettled."""
        process = self._process
        text = process.describe() if process is not None else f"plugin {self._name!r} exited"
        if self._connected.done():
            self._reject_all(PluginAbortedError(f"{text} while checks were pending"))
        else:
            self._reject_all(PluginStartError(f"{text} before connecting"))

    # -- The stream's side, called by the transport ---------------------------

    def on_connected(self, request: plugin_pb2.ListAdmissionsRequest) -> Refusal | None:
        """The plugin called ListAdmissions: open its stream, or say why not."""
        with self._lock:
            claimed, self._stream_claimed = self._stream_claimed, True
        if claimed:
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "ListAdmissions was already called")
        if request.protocol_version != PROTOCOL_VERSION:
            message = (
                f"plugin {self._name!r} speaks admission protocol version "
                f"{request.protocol_version}, the host speaks {PROTOCOL_VERSION}"
            )
            refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, message, final=True)
            error = PluginStartError(message, code=grpc.StatusCode.FAILED_PRECONDITION)
            self._refusal = refusal
            self._reject_all(error)
            if not self._connected.done():
                self._connected.set_exception(error)
            return refusal
        with self._lock:
            connected = self._state is PluginState.STARTING
            if connected:
                self._state = PluginState.CONNECTED
        if not connected:
            return Refusal(grpc.StatusCode.ABORTED, "terminating")
        self._connected.set_result(request.plugin_version)
        self._logger.debug("Plugin '%s' connected (version %r)", self._name, request.plugin_version)
        return None

    def next_admissions(self, timeout: float) -> list[plugin_pb2.Admission] | None:
        """Checks to send now: waits up to ``timeout`` for some; [] if none
        came, None once the stream must end (the plugin broke or closed)."""
        with self._lock:
            if not self._queue and self._state is PluginState.CONNECTED:
                self._has_work.wait(timeout)
            if self._state is not PluginState.CONNECTED:
                return None
            if not self._queue:
                return []
            now = time.monotonic()
            batch: list[plugin_pb2.Admission] = []
            for check in self._queue:
                check.sent_at = now
                if check.admission is not None:
                    batch.append(check.admission)
                    if self._deadlines is not None:
                        # The deadline counts from the sending, not the queueing.
                        self._deadlines.arm((check.admission.admission_id, check))
                # Not kept while the plugin decides: a message holds an arena
                # of its own, and thousands of them in flight fragment the
                # heap that cached promises live in.
                check.admission = None
            self._queue.clear()
            self._has_room.notify_all()
        return batch

    def wake(self) -> None:
        """Wake the stream to look at its call; never waits for the lock.

        Called by gRPC's own threads, which must not block on a plugin's lock
        (its holder may be waiting for gRPC); the stream re-checks on its own
        within ``STREAM_RECHECK`` when the lock is busy.
        """
        if self._lock.acquire(blocking=False):
            try:
                self._has_work.notify_all()
            finally:
                self._lock.release()

    def on_disconnected(self) -> None:
        """The stream is over. If the plugin ended it, the plugin is done for."""
        with self._lock:
            if self._state is not PluginState.CONNECTED:
                return  # ended by us, or already failed
            process = self._process
        # The exit status makes a better message; a crashing plugin's exit
        # usually follows its connection's end within milliseconds.
        if process is not None:
            _first_of(process.exited, self._ended, timeout=EXIT_STATUS_WAIT)
            if process.exited.done():
                self._on_exit(process.exited)
                return
        self._reject_all(PluginAbortedError(f"plugin {self._name!r} closed its admission stream"))

    def resolve(self, admission_id: str, status: status_pb2.Status | None) -> None:
        """Settle one check; unknown IDs (already settled, or never ours) are ignored.

        No status, or OK, admits: the Go SDK sends none when it admits.
        """
        with self._lock:
            check = self._in_flight.pop(admission_id, None)
        if check is None:
            self._logger.debug(
                "Plugin '%s': ignoring an answer to admission %s: it came after the check's "
                "deadline, after the check was settled otherwise, or was never asked",
                self._name,
                admission_id,
            )
            return
        if status is None or status.code == _OK:
            _settle(check.future, None)
        elif status.code == _FAILED_PRECONDITION:
            _settle(check.future, AdmissionDenied(status.message))
        else:
            _settle(
                check.future,
                AdmissionError(status.message, code=code_of(status.code)),
            )

    def _check_expired(self, sent: tuple[str, Check]) -> None:
        """The deadline of a sent check passed: fail it unless it was settled."""
        admission_id, check = sent
        with self._lock:
            if self._in_flight.get(admission_id) is not check:
                return
            del self._in_flight[admission_id]
        _settle(
            check.future,
            AdmissionError(
                f"plugin {self._name!r} did not answer within the {self._check_timeout:g} s check timeout",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            ),
        )
