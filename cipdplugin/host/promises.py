"""Promises only the host settles.

The Future a caller gets from ``check_admission`` is shared: every caller
asking about the same pin holds the same object. So no caller may decide it
for the others. A ``HostFuture`` is a ``concurrent.futures.Future`` in every
way a caller uses one (``result``, ``exception``, ``done``,
``add_done_callback``, ``wait``, ``as_completed``), but ``set_result``,
``set_exception`` and ``set_running_or_notify_cancel`` raise
``InvalidStateError`` and change nothing, and ``cancel`` returns False.

The host settles through ``settle``, its own path. Which call may settle a
promise is decided before, under the owning plugin's (or chain's) lock: the
call that takes a check out of its plugin's table is the only one that
settles it, so ``settle`` needs no lock of its own.

A callback added with ``add_done_callback`` runs on the thread that settles
the promise, as ``concurrent.futures`` promises, except on the server's
event loop (answers are settled there), which must never run the embedding
program's code: there, it is handed to the server's pool.

``result(timeout)`` and ``exception(timeout)`` raise the builtin
``TimeoutError`` on every supported Python: on 3.10,
``concurrent.futures.TimeoutError`` is another class, so the one raised
there is both.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import InvalidStateError
from typing import Any, TypeVar

T = TypeVar("T")

#: ``.offload``, on the server's loop thread: how a callback is run elsewhere.
_thread = threading.local()

_REFUSAL = "only the host settles this promise: it is shared by every caller that asked about the pin"


class HostFuture(futures.Future[T]):
    """A ``concurrent.futures.Future`` that callers can wait on but not settle or cancel."""

    def cancel(self) -> bool:
        """Shared promises cannot be cancelled: always False."""
        return False

    def add_done_callback(self, fn: Callable[[futures.Future[T]], object]) -> None:
        super().add_done_callback(functools.partial(_run_callback, fn))

    def set_result(self, result: T) -> None:
        raise InvalidStateError(_REFUSAL)

    def set_exception(self, exception: BaseException | None) -> None:
        raise InvalidStateError(_REFUSAL)

    def set_running_or_notify_cancel(self) -> bool:
        raise InvalidStateError(_REFUSAL)

    if sys.version_info < (3, 11):

        def result(self, timeout: float | None = None) -> T:
            try:
                return super().result(timeout)
            except futures.TimeoutError:
                raise FutureTimeoutError(f"the promise was not settled within {timeout} s") from None

        def exception(self, timeout: float | None = None) -> BaseException | None:
            try:
                return super().exception(timeout)
            except futures.TimeoutError:
                raise FutureTimeoutError(f"the promise was not settled within {timeout} s") from None


if sys.version_info < (3, 11):

    class FutureTimeoutError(futures.TimeoutError, TimeoutError):
        """A wait on a promise timed out: both the builtin ``TimeoutError`` and
        ``concurrent.futures.TimeoutError``, which differ before Python 3.11."""

else:
    FutureTimeoutError = TimeoutError


def run_callbacks_elsewhere(run_soon: Callable[..., None]) -> None:
    """Make the callbacks of promises settled on the calling thread (the
    server's event loop) run by ``run_soon(fn, *args)`` instead."""
    _thread.offload = run_soon


def _run_callback(fn: Callable[[Any], object], future: futures.Future[Any]) -> None:
    offload = getattr(_thread, "offload", None)
    if offload is not None:
        try:
            offload(_logged_callback, fn, future)
            return
        except RuntimeError:  # the pool is stopped: the server is going away
            pass
    fn(future)


def _logged_callback(fn: Callable[[Any], object], future: futures.Future[Any]) -> None:
    try:
        fn(future)
    except Exception:
        # As concurrent.futures reports a callback's exception.
        logging.getLogger("concurrent.futures").exception("exception calling callback for %r", future)


def settle(future: futures.Future[None], outcome: BaseException | None) -> None:
    """Resolve ``future`` with ``outcome`` (None: a result of None), by the host's own path.

    The caller must be the only one settling it (see the module's docstring).
    Done-callbacks run on this thread.
    """
    if outcome is None:
        futures.Future.set_result(future, None)
    else:
        futures.Future.set_exception(future, outcome)


def settled(outcome: BaseException | None) -> HostFuture[None]:
    """A new promise, already resolved with ``outcome``."""
    future: HostFuture[None] = HostFuture()
    settle(future, outcome)
    return future
