"""The memory measurement, run by ``benchmarks/run.py`` in a fresh interpreter.

Usage: ``python benchmarks/memory.py CHECKS TRACED_CHECKS``. Prints one JSON
object:

* the host's RSS (psutil) before the checks, with CHECKS resolved checks
  kept in the plugin's cache, and after ``clear_cache()`` plus a garbage
  collection, both before and after ``malloc_trim(0)`` (glibc keeps freed
  memory in its heap until asked to give it back; whether the call was
  available is reported as ``malloc_trim``);
* then, for TRACED_CHECKS more checks, the Python heap as ``tracemalloc``
  sees it: what the cache holds, and what is left after ``clear_cache()``.
  This part does not depend on how the allocators keep freed memory.

A fresh interpreter, so that memory freed by earlier measurements cannot
hide this one's growth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import sys
import tracemalloc
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil

from cipdplugin import AdmissionPlugin, Config, Host, Pin

SERVICE_URL = "https://chrome-infra-packages.appspot.com"
ADMIT_PLUGIN = [
    sys.executable,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins.py"),
    "admit",
]
WAIT_LIMIT = 300.0
#: Promises a caller holds at once.
BATCH = 1000


def make_pins(count: int, label: str) -> list[Pin]:
    return [Pin(f"bench/memory-{label}/package-{i % 100}", f"{i:040x}") for i in range(count)]


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's ``malloc_trim(0)``, or None where there is no such call."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def call() -> None:
        trim(0)

    return call


def _rss(trim: Callable[[], None] | None, *, trimmed: bool) -> int:
    gc.collect()
    if trimmed and trim is not None:
        trim()
    return int(psutil.Process().memory_info().rss)


def _check_all(plugin: AdmissionPlugin, pins: list[Pin]) -> None:
    """Check ``pins`` a batch at a time, holding only one batch's promises.

    What is measured is what the cache keeps once callers are done with
    their promises, not a caller's list of every promise it was handed.
    """
    failed = 0
    for start in range(0, len(pins), BATCH):
        futures = [plugin.check_admission(pin) for pin in pins[start : start + BATCH]]
        failed += sum(1 for future in futures if future.exception(WAIT_LIMIT) is not None)
    if failed:
        raise RuntimeError(f"{failed} of {len(pins)} checks failed")


def _traced(plugin: AdmissionPlugin, pins: list[Pin]) -> dict[str, int]:
    """Python heap bytes before, with ``pins`` checked and cached, and after clear_cache()."""
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        _check_all(plugin, pins)
        gc.collect()
        cached = tracemalloc.get_traced_memory()[0]
        plugin.clear_cache()
        gc.collect()
        cleared = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return {"traced_before": before, "traced_cached": cached, "traced_cleared": cleared}


def measure(checks: int, traced_checks: int) -> dict[str, object]:
    """Run ``checks`` distinct checks on a warm plugin and report the RSS at each step."""
    trim = _malloc_trim()
    # The pins are the caller's data: built before the first reading, so
    # the growth is what the library keeps for them.
    pins = make_pins(checks, "rss")
    host = Host(Config(SERVICE_URL))
    try:
        plugin = host.new_admission_plugin(ADMIT_PLUGIN)
        if plugin.check_admission(Pin("bench/warm-up", "f" * 40)).exception(WAIT_LIMIT) is not None:
            raise RuntimeError("the warm-up check failed")
        before = _rss(trim, trimmed=True)
        _check_all(plugin, pins)
        cached = _rss(trim, trimmed=False)
        cached_trimmed = _rss(trim, trimmed=True)
        plugin.clear_cache()
        cleared = _rss(trim, trimmed=False)
        cleared_trimmed = _rss(trim, trimmed=True)
        del pins
        traced = _traced(plugin, make_pins(traced_checks, "traced"))
    finally:
        host.close()
    return {
        **traced,
        "traced_checks": traced_checks,
        "checks": checks,
        "malloc_trim": trim is not None,
        "rss_before": before,
        "rss_cached": cached,
        "rss_cached_trimmed": cached_trimmed,
        "rss_cleared": cleared,
        "rss_cleared_trimmed": cleared_trimmed,
    }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]))))
