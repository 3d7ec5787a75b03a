"""The checks of one admission plugin: queued, in flight, cached, settled.

``AdmissionChecks`` holds everything an admission plugin's checks go
through, under one lock (a plain one: nothing here runs in a signal handler,
since closing happens on a thread of its own):

* the queue of checks not yet sent, bounded by ``max_pending``;
* the table of unsettled checks by admission ID. **Whoever takes a check
  out of it settles its promise**, and nobody else: an answer, a deadline
  and the end of the plugin may race, and the first to take the check wins.
  So a promise is settled exactly once, and its audit record is the outcome
  it ends with;
* the promise cache: pending promises by pin, and for settled ones their
  outcome with only a weak reference to the promise (a resolved Future costs
  about 1.6 KiB, its outcome a few bytes). A later check of the pin gets
  the same promise while anyone holds it, else a new one already settled;
* the check deadlines, armed when a check is queued or the plugin
  connects, whichever is later, and disarmed when the check is answered.

Promises are settled outside the lock, because their callbacks run
arbitrary code.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import grpc

from cipdplugin.constants import STREAM_BATCH
from cipdplugin.deadline import Deadline
from cipdplugin.errors import AdmissionError
from cipdplugin.host.deadlines import CheckDeadlines
from cipdplugin.host.promises import HostFuture, settle, settled
from cipdplugin.pins import Pin
from cipdplugin.protocol import plugin_pb2


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


class Check:
    """One check from the moment it is queued until it is settled."""

    __slots__ = ("__weakref__", "admission", "admission_id", "future", "pin", "queued", "queued_at")

    def __init__(self, pin: Pin, admission: plugin_pb2.Admission) -> None:
        self.pin = pin
        self.admission: plugin_pb2.Admission | None = admission  # dropped once sent
        self.admission_id = admission.admission_id
        self.future: HostFuture[None] = HostFuture()
        self.queued_at = time.monotonic()
        self.queued = True  # in the queue, not yet taken by the stream


class Settled(NamedTuple):
    """What the cache keeps of a settled check: its outcome, and its promise
    for as long as anyone else holds it."""

    promise: weakref.ref[HostFuture[None]]
    outcome: BaseException | None  # None: admitted


#: Told of each check just before its promise is settled (the audit log).
OnSettling = Callable[[Check, "BaseException | None"], None]


class AdmissionChecks:
    """One admission plugin's checks, under one lock. Thread-safe."""

    def __init__(
        self,
        *,
        name: str,
        max_pending: int,
        check_timeout: float | None,
        on_settling: OnSettling | None,
    ) -> None:
        self._name = name
        self._max_pending = max_pending
        self._check_timeout = check_timeout
        self._on_settling = on_settling
        # One lock guards all fields below.
        self._lock = threading.Lock()
        self._has_room = threading.Condition(self._lock)  # queue has room, or ended
        # Called once, outside the lock, when the queue gets a check or the
        # plugin ends: the stream, idle on the server's loop, asked for it.
        self._wake_stream: Callable[[], None] | None = None
        self._queue: deque[Check] = deque()  # not yet taken by the stream, some maybe settled
        self._waiting = 0  # checks in the queue still unsettled: max_pending bounds this
        self._in_flight: dict[str, Check] = {}  # unsettled, by admission ID
        self._promises: dict[Pin, HostFuture[None]] = {}  # pending, by pin
        self._verdicts: dict[Pin, Settled] = {}  # settled, by pin
        self._connected = False  # the plugin connected: deadlines run from queueing
        self._failure: AdmissionError | None = None  # once the plugin ended: what pending checks got
        self._later_failure: AdmissionError | None = None  # and what checks made since get
        # Deadlines of unsettled checks, with check_timeout; it has a lock of its own.
        self._deadlines: CheckDeadlines[Check] | None = (
            None if check_timeout is None else CheckDeadlines(check_timeout, self._expire, name=name)
        )

    @property
    def deadlines(self) -> CheckDeadlines[Check] | None:
        return self._deadlines

    def __len__(self) -> int:
        """Checks not yet settled."""
        return len(self._in_flight)

    # -- The caller's side ------------------------------------------------------------

    def cached(self, pin: Pin) -> HostFuture[None] | None:
        """The promise cached for ``pin``, or None; takes no lock on a hit."""
        found = self._find(pin)
        if not isinstance(found, Settled):
            return found
        with self._lock:
            # Under the lock, so that two callers rebuilding at once get the same promise.
            return self._cached_locked(pin)

    def _cached_locked(self, pin: Pin) -> HostFuture[None] | None:
        found = self._find(pin)
        if not isinstance(found, Settled):
            return found
        # Made settled and then cached: nothing can interrupt it half-way.
        future = settled(found.outcome)
        self._verdicts[pin] = Settled(weakref.ref(future), found.outcome)
        return future

    def _find(self, pin: Pin) -> HostFuture[None] | Settled | None:
        """``pin``'s live promise; else its verdict, if no caller holds its
        promise any more; else None. Single dict lookups and weakref calls
        are atomic: it needs no lock."""
        future = self._promises.get(pin)
        if future is not None:
            return future
        verdict = self._verdicts.get(pin)
        if verdict is None:
            return None
        future = verdict.promise()
        return verdict if future is None else future

    def add(self, pin: Pin, admission: plugin_pb2.Admission, deadline: Deadline) -> HostFuture[None]:
        """Queue a check of ``pin`` (unless one is cached) and return its promise.

        Waits while ``max_pending`` checks wait to be sent, until there is
        room, the plugin ends or ``deadline`` passes. A plugin that ended
        gets a promise already failed.

        Raises:
            TimeoutError: no room before ``deadline``.
        """
        with self._lock:
            while True:
                cached = self._cached_locked(pin)
                if cached is not None:
                    return cached
                if self._later_failure is not None:
                    future = settled(self._later_failure)
                    self._verdicts[pin] = Settled(weakref.ref(future), self._later_failure)
                    return future
                if self._waiting < self._max_pending:
                    break
                # Cannot hang without a deadline: the stream makes room, and
                # every way the plugin can end notifies.
                if not self._has_room.wait(deadline.remaining()) and deadline.expired():
                    raise TimeoutError(f"plugin {self._name!r} had no room for the check in time")
            check = Check(pin, admission)
            # Table first, cache last: an exception landing in between (a
            # KeyboardInterrupt) leaves an unsettled check nobody holds,
            # never a cached promise nobody will settle.
            self._in_flight[check.admission_id] = check
            self._queue.append(check)
            self._waiting += 1
            self._promises[pin] = check.future
            wake, self._wake_stream = self._wake_stream, None
        if wake is not None:
            wake()
        if self._connected and self._deadlines is not None:
            self._deadlines.arm((check,))
        return check.future

    def refuse(self, pin: Pin, error: AdmissionError) -> HostFuture[None]:
        """A promise for ``pin`` failed with ``error`` at once, cached like any other."""
        with self._lock:
            cached = self._cached_locked(pin)
            if cached is not None:
                return cached
            future = settled(error)
            self._verdicts[pin] = Settled(weakref.ref(future), error)
            return future

    def clear_cache(self) -> None:
        """Forget settled promises; pending ones stay shared."""
        with self._lock:
            self._verdicts = {}
            # A dict keeps the table of its largest size; a copy of the few
            # checks still in flight gives a burst's table back.
            self._in_flight = dict(self._in_flight)
            self._promises = dict(self._promises)

    # -- The stream's side --------------------------------------------------------------

    def connected(self) -> None:
        """The plugin connected: checks queued so far start their deadlines now."""
        with self._lock:
            self._connected = True
            queued = [check for check in self._queue if self._in_flight.get(check.admission_id) is check]
        if self._deadlines is not None:
            self._deadlines.arm(queued)

    def poll(self, wake: Callable[[], None]) -> list[Check] | None:
        """The next checks to send (at most ``STREAM_BATCH``), without
        waiting: send each with ``sendable``. None once the stream must end
        (the plugin ended). With none to send, an empty list, and ``wake()``
        is called once there are (or the plugin ends), from the thread that
        queues them: it must not block."""
        with self._lock:
            if self._failure is not None:
                return None
            queue = self._queue
            if not queue:
                self._wake_stream = wake
                return []
            batch = [queue.popleft() for _ in range(min(len(queue), STREAM_BATCH))]
            for check in batch:
                if check.queued:
                    check.queued = False
                    self._waiting -= 1
            self._has_room.notify_all()
        return batch

    def sendable(self, check: Check) -> plugin_pb2.Admission | None:
        """``check``'s message, to send now; None if the check was settled
        meanwhile (its deadline passed while it waited to be sent).

        The message is not kept once handed over: a message holds an arena
        of its own, and thousands of them in flight fragment the heap that
        cached promises live in. A check without it counts as sent.
        """
        admission, check.admission = check.admission, None
        # A single dict lookup: atomic, no lock needed to read it.
        return admission if self._in_flight.get(check.admission_id) is check else None

    def answer_room(self) -> int:
        """How many answers the plugin may be sending at once: one per unsettled check."""
        return len(self._in_flight)

    def resolve(self, admission_id: str, outcome: BaseException | None) -> bool:
        """Settle the check ``admission_id`` with ``outcome``; False if it is
        no longer unsettled (answered late, failed otherwise, or never asked)."""
        with self._lock:
            check = self._in_flight.pop(admission_id, None)
            if check is None:
                return False
            self._keep(check, outcome)
        if self._deadlines is not None:
            self._deadlines.disarm(check)
        self._settle(check, outcome)
        return True

    def _expire(self, check: Check) -> None:
        """A check's deadline passed: fail it unless it was settled meanwhile.

        A pin checked again after ``clear_cache()`` has the same admission
        ID: only *this* check may be failed.
        """
        assert self._check_timeout is not None
        with self._lock:
            if self._in_flight.get(check.admission_id) is not check:
                return
            del self._in_flight[check.admission_id]
            sent = check.admission is None
            if check.queued:
                # Its place in the queue is free now; its entry there is
                # skipped when the stream reaches it.
                check.queued = False
                check.admission = None
                self._waiting -= 1
                self._has_room.notify()
            error = AdmissionError(
                f"plugin {self._name!r} did not answer within the {self._check_timeout:g} s check timeout"
                + ("" if sent else " (the check was still waiting to be sent: the plugin stopped reading)"),
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            self._keep(check, error)
        self._settle(check, error)

    # -- The end --------------------------------------------------------------------------

    def fail_all(self, error: AdmissionError, later: AdmissionError) -> None:
        """The plugin ended: fail every unsettled check with ``error``, and
        every check made from now on with ``later``."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = error
            self._later_failure = later
            failed = list(self._in_flight.values())
            self._in_flight.clear()
            self._queue.clear()
            self._waiting = 0
            for check in failed:
                self._keep(check, error)
            self._has_room.notify_all()
            wake, self._wake_stream = self._wake_stream, None
        if wake is not None:
            wake()
        if self._deadlines is not None:
            self._deadlines.stop()
        for check in failed:
            self._settle(check, error)

    # -- Settling ------------------------------------------------------------------------

    def _keep(self, check: Check, outcome: BaseException | None) -> None:
        """Move ``check``'s promise from the pending cache to the settled one (under the lock)."""
        if self._promises.get(check.pin) is check.future:
            del self._promises[check.pin]
            self._verdicts[check.pin] = Settled(weakref.ref(check.future), outcome)

    def _settle(self, check: Check, outcome: BaseException | None) -> None:
        """Record and settle a check this thread took out of the table (outside the lock)."""
        if self._on_settling is not None:
            try:
                self._on_settling(check, outcome)
            except Exception:
                # The promise must still resolve: a record is never worth a verdict.
                logging.getLogger("cipdplugin").exception("cannot record the outcome of a check")
        settle(check.future, outcome)
