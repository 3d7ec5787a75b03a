"""Each plugin's calls have a budget of their own: one plugin using it up
delays no other, and answers are never refused for capacity."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import wait

from cipdplugin import Config, ListMetadataRequest, ListMetadataResponse, Pin, StaticRepository
from cipdplugin.constants import FUTEX_TABLE_WIDEN_AT, PLUGIN_CALL_BUDGET
from tests.conftest import SERVICE_URL, HostFactory, hex_id, plugin_cmd, run_host_program
from tests.plugins.host_program import HELD_BEYOND_BUDGET


def test_a_plugin_holding_its_budget_delays_no_other() -> None:
    # In a process of its own, on one CPU: see host_program.budget_held.
    report = run_host_program("budget-held", timeout=180)
    hold, alone, held = report["hold"], report["alone"], report["held"]

    # A plugin with its own valid ticket opened more Log calls than its
    # budget and never sent their requests.
    assert hold["open"] == PLUGIN_CALL_BUDGET
    # Every call beyond the budget is refused at once. Now and then grpcio
    # reports a refusal made before the request was read to its client as
    # CANCELLED (as it does for unticketed calls): a refusal all the same.
    codes = hold["codes"]
    assert sum(codes.values()) == HELD_BEYOND_BUDGET and set(codes) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}
    assert codes.get("RESOURCE_EXHAUSTED", 0) >= HELD_BEYOND_BUDGET - 5

    # Meanwhile a running plugin kept its speed, and a new one started and answered.
    assert report["newcomer"] == "None"
    assert statistics.mean(alone) / statistics.mean(held) >= 0.8, (alone, held)
    # The held calls hold no thread: they wait on the server's event loop.
    # (When they held one each, with the kernel's 16 futex buckets, their
    # threads made every lock of the process slower: the ratio above was
    # about 0.75 until the futex table was widened.)
    assert report["threads"] < FUTEX_TABLE_WIDEN_AT, report["threads"]


class SlowRepository:
    """Metadata that takes ``seconds`` to list, counting calls in flight."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._inner = StaticRepository()
        # Guards the two counters below.
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(self._seconds)
            return self._inner.list_metadata(request)
        finally:
            with self._lock:
                self.in_flight -= 1


def test_32_plugins_with_16_checks_each_on_a_repository_that_takes_3_s(make_host: HostFactory) -> None:
    repository = SlowRepository(3.0)
    host = make_host(Config(SERVICE_URL, repository))
    plugins = [host.new_admission_plugin(plugin_cmd("metadata")) for _ in range(32)]
    checks = [
        plugin.check_admission(Pin(f"slow/pkg{index}", hex_id(n)))
        for index, plugin in enumerate(plugins)
        for n in range(16)
    ]
    done, pending = wait(checks, timeout=120)
    assert not pending
    # Every check was answered by its plugin: no metadata, so each is denied
    # for that reason, never failed for capacity.
    messages = {future.exception().message for future in done}  # type: ignore[union-attr]
    assert all("allow" in message for message in messages), messages
    assert repository.peak == 32 * 16
