"""Room in the kernel's futex table for a process that runs many threads.

Since Linux 6.16, a threaded process hashes its futexes into a private table
of four buckets per online CPU, at least 16, which the kernel grows with the
CPUs but not with the threads. Every lock, condition and semaphore a thread
blocks on is a futex, and every wake and wait walks the chain of its
bucket. Both sides of cipdplugin can have a thousand threads blocked: a
plugin holding its budget of calls, or a thousand metadata calls in flight.
On a 2-CPU machine every futex operation of the whole process then walks
about 60 entries. Measured on one core: a burst of 1,000 checks took 1.3x as
long while another plugin held 1,024 calls, and the host's system time
doubled. With 4,096 buckets the held calls cost nothing measurable.

So once a pool of ours grows past ``FUTEX_TABLE_WIDEN_AT`` threads, the
process's table is widened to ``FUTEX_TABLE_SLOTS`` buckets
(``prctl(PR_FUTEX_HASH)``). It is only ever widened, never if the process
chose the kernel's global table, and on other kernels and systems nothing
happens. The kernel waits for a grace period to swap tables (40 ms here), so
the widening runs on a thread of its own, which ends after that one call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from cipdplugin.constants import FUTEX_TABLE_SLOTS

_PR_FUTEX_HASH = 78
_PR_FUTEX_HASH_SET_SLOTS = 1
_PR_FUTEX_HASH_GET_SLOTS = 2

# Guards _widened_in.
_lock = threading.Lock()
_widened_in: int | None = None  # the process that asked already (a fork child asks anew)


def widen_futex_table() -> None:
    """Widen this process's futex table, once per process, without waiting for it."""
    global _widened_in
    if not sys.platform.startswith("linux"):
        return
    pid = os.getpid()
    with _lock:
        if _widened_in == pid:
            return
        _widened_in = pid
    # With no thread to spare, the table stays as it is, which only costs speed.
    with contextlib.suppress(RuntimeError):
        threading.Thread(target=_widen, name="cipdplugin-futex-table", daemon=True).start()


def futex_table_slots() -> int | None:
    """Buckets of this process's private futex table: 0 if it uses the
    kernel's global one, None if the kernel cannot tell."""
    slots = _futex_hash(_PR_FUTEX_HASH_GET_SLOTS)
    return None if slots is None or slots < 0 else slots


def _widen() -> None:
    slots = futex_table_slots()
    if slots is not None and 0 < slots < FUTEX_TABLE_SLOTS:
        # A failure (a kernel that refuses the size) leaves the table as it was.
        _futex_hash(_PR_FUTEX_HASH_SET_SLOTS, FUTEX_TABLE_SLOTS)


def _futex_hash(operation: int, slots: int = 0) -> int | None:
    """``prctl(PR_FUTEX_HASH, operation, slots)``; None without a C library that has prctl."""
    import ctypes  # only here: the SDK's import time counts

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    # The arguments after the first are unsigned longs: passed as ints, their
    # upper halves would be whatever the registers held.
    arguments = [ctypes.c_ulong(value) for value in (operation, slots, 0, 0)]
    return int(prctl(_PR_FUTEX_HASH, *arguments))
