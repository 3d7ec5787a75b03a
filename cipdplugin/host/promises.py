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

``result(timeout)`` and ``exception(timeout)`` raise the builtin
``TimeoutError`` on every supported Python: on 3.10,
``concurrent.futures.TimeoutError`` is another class, so the one raised
there is both.
"""

from __future__ import annotations

import sys
from concurrent import futures
from concurrent.futures import InvalidStateError
from typing import TypeVar

T = TypeVar("T")

_REFUSAL = "only the host settles this promise: it is shared by every caller that asked about the pin"


class HostFuture(futures.Future[T]):
    """A ``concurrent.futures.Future`` that callers can wait on but not settle or cancel."""

    def cancel(self) -> bool:
        """Shared promises cannot be cancelled: always False."""
        return False

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
