"""Programs that run a Host in a process of their own, for what a test must
not do to its own interpreter: fork it, interrupt it with signals, exit it.

Usage: host_program.py MODE. Each mode prints one JSON object on stdout.

* ``fork``: starts an admission plugin, then forks: a ``multiprocessing``
  worker (fork start method, which runs threading's exit hooks), a bare
  ``os.fork()`` child that exits through ``sys.exit`` (which runs atexit),
  and one that tries to use the inherited host. Reports how each child
  ended and how long it took, and the parent's next check.
* ``close-in-signal-handler``: keeps the main thread inside
  ``check_admission()`` and ``clear_cache()`` while SIGALRM's handler calls
  ``Host.close(timeout=2)``; two rounds. Reports each close's duration and
  how many Futures handed out were still pending once it was done.
* ``interrupt-checks``: raises KeyboardInterrupt into ``check_admission()``
  from SIGALRM every millisecond for two seconds, then closes the host.
  Reports how many Futures handed out (or cached) were pending after close.
* ``budget-held``: on one CPU, times bursts of 1,000 checks to one plugin,
  then has a hostile plugin hold more Log calls than its budget, times as
  many bursts again, and starts one more plugin. Reports the burst times,
  the hostile plugin's report, the newcomer's first verdict, the size of
  the process's futex table and the threads of the process while held.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cipdplugin import AdmissionPlugin, Config, Host, Pin, StaticRepository

TEST_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "admission_plugin.py")
HOSTILE_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile.py")
SERVICE_URL = "https://cipd.example.com"


def pins(count: int) -> list[Pin]:
    return [Pin("test/pkg", f"{n:040x}") for n in range(count)]


def admitting_plugin(host: Host) -> AdmissionPlugin:
    plugin = host.new_admission_plugin([sys.executable, TEST_PLUGIN, "admit"])
    plugin.check_admission(pins(1)[0]).result(timeout=60)
    return plugin


def _exit_quietly() -> None:
    pass  # Exits through multiprocessing's bootstrap, which runs threading's exit hooks.


def _use_inherited(host: Host, plugin: AdmissionPlugin) -> int:
    """0 if a child may neither check nor launch through the parent's host."""
    for use in (lambda: plugin.check_admission(pins(2)[1]), lambda: host.new_admission_plugin(["x"])):
        try:
            use()
        except RuntimeError:
            continue
        return 3
    host.close()  # does nothing in a child
    return 0


def _fork_and_exit(child: Any) -> dict[str, Any]:
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        sys.exit(child())  # atexit hooks run here
    _, status = os.waitpid(pid, 0)
    return {"exitcode": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - started}


def fork() -> dict[str, Any]:
    host = Host(Config(SERVICE_URL, StaticRepository()))
    plugin = admitting_plugin(host)
    report: dict[str, Any] = {}

    started = time.monotonic()
    worker = multiprocessing.get_context("fork").Process(target=_exit_quietly)
    worker.start()
    worker.join(60)
    report["worker"] = {"exitcode": worker.exitcode, "seconds": time.monotonic() - started}
    report["child"] = _fork_and_exit(lambda: 0)
    report["child using the host"] = _fork_and_exit(lambda: _use_inherited(host, plugin))

    error = plugin.check_admission(pins(3)[2]).exception(timeout=60)
    report["parent check after forks"] = "admitted" if error is None else repr(error)
    process = plugin.process
    report["plugin running"] = process is not None and not process.exited.done()
    host.close()
    return report


def close_in_signal_handler() -> dict[str, Any]:
    rounds = []
    for round_number in range(2):
        host = Host(Config(SERVICE_URL, StaticRepository()))
        plugin = admitting_plugin(host)
        every_pin = pins(3000)
        handed_out: list[Future[None]] = []
        closed: dict[str, float] = {}

        def close_now(signum: int, frame: Any, host: Host = host, closed: dict[str, float] = closed) -> None:
            started = time.monotonic()
            host.close(timeout=2)
            closed["seconds"] = time.monotonic() - started

        signal.signal(signal.SIGALRM, close_now)
        signal.setitimer(signal.ITIMER_REAL, 0.3 + 0.2 * round_number)
        deadline = time.monotonic() + 60
        while "seconds" not in closed and time.monotonic() < deadline:
            handed_out.extend(plugin.check_admission(pin) for pin in every_pin)
            plugin.clear_cache()
        signal.setitimer(signal.ITIMER_REAL, 0)
        # A close whose wait was cut short (the handler interrupted this
        # thread inside a lock the close needs) still finishes, on its own
        # thread: a second close waits for it.
        host.close()
        rounds.append(
            {
                "close seconds": closed.get("seconds"),
                "pending after close": sum(not future.done() for future in handed_out),
            }
        )
    return {"rounds": rounds}


def interrupt_checks() -> dict[str, Any]:
    host = Host(Config(SERVICE_URL, StaticRepository()))
    plugin = admitting_plugin(host)
    every_pin = pins(200)
    handed_out: list[Future[None]] = []
    interrupts = 0

    # Armed only inside the try below, so that no interrupt lands on the
    # loop's own jumps. The handler disarms itself as it raises: on Python
    # 3.10 a signal handler may run before the except clause's first store,
    # and a second interrupt there would escape the try.
    armed = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal armed
        if armed:
            armed = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            armed = True
            for pin in every_pin:
                handed_out.append(plugin.check_admission(pin))
            plugin.clear_cache()
            armed = False
        except KeyboardInterrupt:
            armed = False
            interrupts += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    # What the cache now holds is what later callers would get.
    handed_out.extend(plugin.check_admission(pin) for pin in every_pin)
    host.close()
    return {"interrupts": interrupts, "pending after close": sum(not future.done() for future in handed_out)}


#: Checks per timed burst of ``budget_held``, and bursts before and during the hold.
BURST, RUNS = 1000, 7


def budget_held() -> dict[str, Any]:
    # One CPU for this process, its threads and its plugins (they inherit
    # it): on two, a burst's time varies threefold from run to run, as the
    # threads happen to share a core or not; on one it varies by a tenth,
    # and whatever the held calls cost shows in full.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from cipdplugin.constants import PLUGIN_CALL_BUDGET
    from cipdplugin.futexes import futex_table_slots

    host = Host(Config(SERVICE_URL, StaticRepository()))
    worker = admitting_plugin(host)

    def burst_seconds(first: int) -> float:
        burst = [Pin("speed/pkg", f"{first + n:040x}") for n in range(BURST)]
        started = time.monotonic()
        promises = [worker.check_admission(pin) for pin in burst]
        if any(promise.exception(timeout=120) is not None for promise in promises):
            raise AssertionError("a check of the admitting plugin failed")
        return time.monotonic() - started

    alone = [burst_seconds(1_000_000 * (1 + n)) for n in range(RUNS)]
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "hold.json")
        count = str(PLUGIN_CALL_BUDGET + HELD_BEYOND_BUDGET)
        host.launch_plugin([sys.executable, HOSTILE_PLUGIN, "hold", report, count], object())
        deadline = time.monotonic() + 30
        while not os.path.exists(report) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(report) as file:
            hold = json.load(file)
    held = [burst_seconds(1_000_000 * (10 + n)) for n in range(RUNS)]
    threads = threading.active_count()
    newcomer = host.new_admission_plugin([sys.executable, TEST_PLUGIN, "admit"])
    first = newcomer.check_admission(Pin("new/comer", f"{1:040x}")).exception(timeout=30)
    slots = futex_table_slots()
    host.close()
    return {
        "alone": alone,
        "held": held,
        "hold": hold,
        "newcomer": repr(first),
        "futex table": slots,
        "threads": threads,
    }


#: Log calls ``budget_held``'s hostile plugin opens beyond its budget.
HELD_BEYOND_BUDGET = 50


def main(argv: list[str]) -> int:
    modes = {
        "fork": fork,
        "close-in-signal-handler": close_in_signal_handler,
        "interrupt-checks": interrupt_checks,
        "budget-held": budget_held,
    }
    print(json.dumps(modes[argv[1]]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
