"""Leaks over time: many checks across plugin restarts.

``test_soak`` (slow, run by ``make soak``) sends 1,000,000 checks through
20 plugin lifetimes and prints memory and descriptor counts as it goes;
``CIPDPLUGIN_SOAK_CHECKS`` sets another total. The short test runs in
``make test`` and shows the same return to baseline over a few cycles.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import psutil
import pytest

from cipdplugin import Config, Host, StaticRepository
from tests.conftest import (
    SERVICE_URL,
    ResourceSnapshot,
    assert_no_leaks,
    hex_id,
    plugin_cmd,
    zombies,
)

SOAK_CHECKS = int(os.environ.get("CIPDPLUGIN_SOAK_CHECKS", "1000000"))
SOAK_ROUNDS = 20
#: Memory the second half of the soak may gain. The first rounds grow the
#: allocator's arenas and gRPC's buffers to their working size (about
#: 50 MiB over 1,000,000 checks on a 2-core Linux machine), then RSS stays
#: flat; a leak of 64 bytes per check would add 32 MiB over the second half.
RSS_GROWTH_LIMIT = 32 * 1024 * 1024


def pins(first: int, count: int) -> Iterator[str]:
    return (f"soak/pkg:{hex_id(n)}" for n in range(first, first + count))


def resource_baseline() -> ResourceSnapshot:
    """Resources after one full host cycle (gRPC's global setup is not a leak)."""
    with Host(Config(SERVICE_URL, StaticRepository())) as host:
        host.new_admission_plugin(plugin_cmd("admit")).check_admission(next(pins(0, 1))).result(60)
    return ResourceSnapshot()


def run_round(host: Host, first: int, count: int) -> int:
    """One plugin lifetime: ``count`` checks, then clear the cache and close.

    Returns how many checks were not admitted.
    """
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    checks = [plugin.check_admission(pin) for pin in pins(first, count)]
    done, not_done = futures.wait(checks, timeout=600)
    assert not not_done, f"{len(not_done)} checks never resolved"
    failures = sum(check.exception() is not None for check in done)
    plugin.clear_cache()
    plugin.close()
    return failures


def test_repeated_restarts_return_to_baseline() -> None:
    before = resource_baseline()
    for cycle in range(3):
        with Host(Config(SERVICE_URL, StaticRepository())) as host:
            for plugin_round in range(2):
                first = (cycle * 2 + plugin_round) * 300
                assert run_round(host, first, 300) == 0
        assert not zombies()
    assert_no_leaks(before)


class Gauge:
    """This process's memory, descriptors and threads, for the soak's report."""

    def __init__(self) -> None:
        self._process = psutil.Process()

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def line(self, label: str) -> str:
        return (
            f"{label}: rss {self.rss() / 2**20:.1f} MiB, fds {self._process.num_fds()}, "
            f"threads {threading.active_count()}"
        )


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_soak(capsys: pytest.CaptureFixture[str]) -> None:
    per_round = SOAK_CHECKS // SOAK_ROUNDS
    gauge = Gauge()
    before = resource_baseline()
    started = time.monotonic()

    def report(label: str) -> None:
        with capsys.disabled():
            print(f"[{time.monotonic() - started:7.1f} s] {gauge.line(label)}", flush=True)

    report("baseline")
    rss_by_round: list[int] = []
    failures = 0
    with Host(Config(SERVICE_URL, StaticRepository())) as host:
        for plugin_round in range(SOAK_ROUNDS):
            failures += run_round(host, plugin_round * per_round, per_round)
            rss_by_round.append(gauge.rss())
            report(f"round {plugin_round + 1:2}/{SOAK_ROUNDS}, {(plugin_round + 1) * per_round:,} checks")
    report("closed")
    assert failures == 0
    assert_no_leaks(before)
    assert not zombies()
    elapsed = time.monotonic() - started
    warm_growth = rss_by_round[-1] - rss_by_round[0]
    late_growth = rss_by_round[-1] - rss_by_round[SOAK_ROUNDS // 2 - 1]
    with capsys.disabled():
        print(
            f"soak: {per_round * SOAK_ROUNDS:,} checks in {elapsed:.0f} s "
            f"({per_round * SOAK_ROUNDS / elapsed:,.0f}/s); RSS grew {warm_growth / 2**20:.1f} MiB "
            f"after round 1, {late_growth / 2**20:.1f} MiB over the second half",
            flush=True,
        )
    assert late_growth < RSS_GROWTH_LIMIT
