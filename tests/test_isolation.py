"""Each plugin's calls have a budget of their own: one plugin using it up
delays no other, and answers are never refused for capacity."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import wait
from pathlib import Path

from cipdplugin import Config, ListMetadataRequest, ListMetadataResponse, Pin, StaticRepository
from cipdplugin.constants import PLUGIN_CALL_BUDGET
from cipdplugin.host import AdmissionPlugin
from tests.conftest import SERVICE_URL, HostFactory, hex_id, hostile_cmd, plugin_cmd, read_result

#: Checks per timed burst.
BURST = 1000
#: Timed bursts with the other plugin idle, and as many with it holding its budget.
RUNS = 9


def _burst_seconds(plugin: AdmissionPlugin, first: int) -> float:
    pins = [Pin("speed/pkg", hex_id(first + n)) for n in range(BURST)]
    started = time.monotonic()
    futures = [plugin.check_admission(pin) for pin in pins]
    done, pending = wait(futures, timeout=120)
    assert not pending
    assert all(future.exception() is None for future in done)
    return time.monotonic() - started


def test_a_plugin_holding_its_budget_delays_no_other(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host()
    worker = host.new_admission_plugin(plugin_cmd("admit"))
    assert worker.check_admission(Pin("warm/up", hex_id(0))).result(timeout=30) is None
    alone = [_burst_seconds(worker, 1_000_000 * (1 + n)) for n in range(RUNS)]

    # A plugin with its own valid ticket opens more Log calls than its budget
    # and never sends their requests.
    report = tmp_path / "hold.json"
    extra = 50
    host.launch_plugin(hostile_cmd("hold", str(report), str(PLUGIN_CALL_BUDGET + extra)), object())
    result = read_result(report)
    assert result["open"] == PLUGIN_CALL_BUDGET
    # Every call beyond the budget is refused at once. Now and then grpcio
    # reports a refusal made before the request was read to its client as
    # CANCELLED (as it does for unticketed calls): a refusal all the same.
    codes = result["codes"]
    assert sum(codes.values()) == extra and set(codes) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}
    assert codes.get("RESOURCE_EXHAUSTED", 0) >= extra - 5

    # Meanwhile a running plugin keeps its speed, and a new one starts and answers.
    held = [_burst_seconds(worker, 1_000_000 * (10 + n)) for n in range(RUNS)]
    newcomer = host.new_admission_plugin(plugin_cmd("admit"))
    assert newcomer.check_admission(Pin("new/comer", hex_id(1))).result(timeout=30) is None
    # The mean of several runs each: a run's time is not the same twice on
    # 2 cores (runs fall into a fast and a slow mode, alone or not), and a
    # mean moves less than a median when a few runs change mode.
    assert statistics.mean(alone) / statistics.mean(held) >= 0.8, (alone, held)


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
