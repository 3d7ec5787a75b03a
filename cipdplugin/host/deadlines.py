"""Per-check deadlines of one admission plugin: one timer thread, not one per check.

Every check of a plugin gets the same ``check_timeout``, counted from when
the check was queued or the plugin connected, whichever is later. Checks
are armed in that order, so deadlines fall due in the order they were armed:
an insertion-ordered table is all the bookkeeping needed, with the earliest
deadline at its head. An answered check is disarmed at once, so the keeper
holds only checks still waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from cipdplugin.deadline import checked_timeout

Key = TypeVar("Key")


def checked_check_timeout(value: object) -> float | None:
    """``value`` as a check timeout: None, or a finite positive number of seconds.

    Raises:
        TypeError: ``value`` is not a number (booleans are not numbers here).
        ValueError: ``value`` is not finite and positive.
    """
    return None if value is None else checked_timeout(value, "check_timeout")


class CheckDeadlines(Generic[Key]):
    """Calls ``on_expired(key)`` ``timeout`` seconds after ``arm(key)``, unless disarmed.

    The timer thread starts with the first ``arm`` and ends at ``stop()``;
    the owner joins it with ``join()``. ``on_expired`` runs on that thread,
    outside this object's lock. Keys must be hashable and distinct.
    """

    def __init__(self, timeout: float, on_expired: Callable[[Key], None], *, name: str) -> None:
        self._timeout = timeout
        self._on_expired = on_expired
        self._name = name
        # Guards the fields below; the condition wakes the timer thread.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._due: OrderedDict[Key, float] = OrderedDict()  # key -> monotonic due time, in arming order
        self._stopped = False
        self._thread: threading.Thread | None = None  # started by the first arm()

    def __len__(self) -> int:
        """Checks armed and not yet disarmed or expired."""
        return len(self._due)

    def arm(self, keys: Iterable[Key]) -> None:
        """Start the deadlines of ``keys`` now. Does nothing once stopped."""
        due = time.monotonic() + self._timeout
        with self._lock:
            if self._stopped:
                return
            was_empty = not self._due
            for key in keys:
                self._due[key] = due
            if self._thread is None and self._due:
                self._thread = threading.Thread(
                    target=self._run, name=f"cipdplugin-deadlines-{self._name}", daemon=True
                )
                self._thread.start()
            if was_empty:
                # Only a new head changes when the thread must wake.
                self._changed.notify()

    def disarm(self, key: Key) -> None:
        """Forget ``key``'s deadline (its check was settled otherwise)."""
        with self._lock:
            self._due.pop(key, None)

    def stop(self) -> None:
        """Forget every deadline and tell the thread to end; does not wait."""
        with self._lock:
            self._stopped = True
            self._due.clear()
            self._changed.notify()

    def join(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for the thread to end (after ``stop()``)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped:
                    if self._due:
                        wait = next(iter(self._due.values())) - time.monotonic()
                        if wait <= 0:
                            break
                    else:
                        wait = None
                    # Cannot hang: arm() notifies when the table gains a
                    # head, and stop() always notifies.
                    self._changed.wait(wait)
                if self._stopped:
                    return
                now = time.monotonic()
                expired = []
                while self._due:
                    key, due = next(iter(self._due.items()))
                    if due > now:
                        break
                    self._due.popitem(last=False)
                    expired.append(key)
            for key in expired:
                try:
                    self._on_expired(key)
                except Exception:
                    # The thread must live on: later deadlines depend on it.
                    logging.getLogger("cipdplugin").exception(
                        "Plugin '%s': a check deadline failed", self._name
                    )
