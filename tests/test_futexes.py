"""The futex table grows with our pools (cipdplugin/futexes.py), on kernels
that give each process a table of its own (Linux 6.16 and later)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cipdplugin.constants import FUTEX_TABLE_SLOTS, FUTEX_TABLE_WIDEN_AT

#: Run in a fresh interpreter: the widening happens once per process, and
#: this one's pools have long since grown. Prints the table's size before
#: and after a pool of THREADS blocked threads, and the pool's size.
PROBE = """
import json, sys, threading, time
from cipdplugin.futexes import futex_table_slots
from cipdplugin.threads import DaemonThreads
threads, choose_global = int(sys.argv[1]), sys.argv[2] == "global"
# The kernel makes the table when the process starts its second thread.
first = threading.Thread(target=lambda: None)
first.start()
first.join()
if choose_global:
    from cipdplugin import futexes
    futexes._futex_hash(futexes._PR_FUTEX_HASH_SET_SLOTS, 0)
release = threading.Event()
pool = DaemonThreads(threads * 2, name="probe")
started = threading.Semaphore(0)
def block():
    started.release()
    release.wait(60)
before = futex_table_slots()
for _ in range(threads):
    pool.submit(block)
for _ in range(threads):
    assert started.acquire(timeout=30)
# The widening runs on a thread of its own (40 ms here): wait for a change,
# and where none should come, long enough that a wrong one would have.
deadline = time.monotonic() + (5.0 if threads >= 64 and not choose_global else 0.5)
while futex_table_slots() == before and time.monotonic() < deadline:
    time.sleep(0.01)
after = futex_table_slots()
release.set()
pool.stop(5)
print(json.dumps({"before": before, "after": after, "pool": threads}))
"""


def _probe(threads: int, table: str = "private") -> dict[str, int | None]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(threads), table],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, int | None] = json.loads(done.stdout)
    return report


@pytest.fixture(scope="module")
def private_tables() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("futex tables per process are a Linux feature")
    if _probe(2)["before"] in (None, 0):
        pytest.skip("this kernel has no futex table per process (PR_FUTEX_HASH, Linux 6.16)")


@pytest.mark.usefixtures("private_tables")
def test_a_pool_with_many_threads_widens_the_table() -> None:
    report = _probe(FUTEX_TABLE_WIDEN_AT + 36)
    assert report["before"] is not None and report["before"] < FUTEX_TABLE_SLOTS
    assert report["after"] == FUTEX_TABLE_SLOTS


@pytest.mark.usefixtures("private_tables")
def test_a_small_pool_leaves_the_table_to_the_kernel() -> None:
    report = _probe(8)
    assert report["after"] == report["before"]


@pytest.mark.usefixtures("private_tables")
def test_a_process_that_chose_the_global_table_keeps_it() -> None:
    report = _probe(FUTEX_TABLE_WIDEN_AT + 36, "global")
    assert report["before"] == 0
    assert report["after"] == 0
