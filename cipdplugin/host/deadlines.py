"""Per-check deadlines of one admission plugin: one timer thread, not one per check.

Every check of a plugin gets the same ``check_timeout`` and is armed when it
is sent, in sending order, so deadlines fall due in the order they were
armed: a FIFO queue is all the bookkeeping needed. A check answered in time
stays in the queue until its deadline and is skipped then (``on_expired``
finds nothing to do), which is cheaper than removing it on every answer.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from cipdplugin.deadline import Deadline, checked_timeout

Key = TypeVar("Key")


def checked_check_timeout(value: object) -> float | None:
    """``value`` as a check timeout: None, or a finite positive number of seconds.

    Raises:
        TypeError: ``value`` is not a number (booleans are not numbers here).
        ValueError: ``value`` is not finite and positive.
    """
    return None if value is None else checked_timeout(value, "check_timeout")


class CheckDeadlines(Generic[Key]):
    """Calls ``on_expired(key)`` ``timeout`` seconds after each ``arm(key)``.

    The timer thread starts with the first ``arm`` and ends at ``stop()``;
    the owner joins it with ``join()``. ``on_expired`` runs on that thread,
    outside any lock of this object.
    """

    def __init__(self, timeout: float, on_expired: Callable[[Key], None], *, name: str) -> None:
        self._timeout = timeout
        self._on_expired = on_expired
        self._name = name
        # Guards the fields below; the condition wakes the timer thread.
        # Re-entrant: the plugin's close may run in a signal handler that
        # interrupted this thread inside arm().
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._pending: deque[tuple[Deadline, Key]] = deque()  # falling due in this order
        self._stopped = False
        self._thread: threading.Thread | None = None  # started by the first arm()

    def arm(self, key: Key) -> None:
        """Start ``key``'s deadline now. Does nothing once stopped."""
        due = Deadline(self._timeout)
        with self._lock:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"cipdplugin-deadlines-{self._name}", daemon=True
                )
                self._thread.start()
            self._pending.append((due, key))
            if len(self._pending) == 1:
                # Only a new head changes when the thread must wake.
                self._changed.notify()

    def stop(self) -> None:
        """Forget every deadline and tell the thread to end; does not wait."""
        with self._lock:
            self._stopped = True
            self._pending.clear()
            self._changed.notify()

    def join(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for the thread to end (after ``stop()``)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not (self._pending and self._pending[0][0].expired()):
                    # Cannot hang: arm() notifies when the queue gains a head,
                    # and stop() always notifies.
                    self._changed.wait(self._pending[0][0].remaining() if self._pending else None)
                if self._stopped:
                    return
                expired = []
                while self._pending and self._pending[0][0].expired():
                    expired.append(self._pending.popleft()[1])
            for key in expired:
                try:
                    self._on_expired(key)
                except Exception:
                    # The thread must live on: later deadlines depend on it.
                    logging.getLogger("cipdplugin").exception(
                        "Plugin '%s': a check deadline failed", self._name
                    )
