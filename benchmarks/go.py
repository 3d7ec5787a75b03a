"""The sections measured against the Go CIPD client (luci-go's binaries in
../shared/anchors/bin, see tests/go_anchors.py): each of our pairings beside
its bare grpcio baseline and beside Go host ⇄ Go plugin, in the same run.

``go-steady``: steady throughput of a trivial policy, N checks after one
warm-up check, for five pairings, interleaved in each repetition (each pair
of ours and its baseline adjacent, which goes first alternating):

* Go host → our SDK plugin (``plugins.py admit``), beside
* Go host → the bare grpcio plugin (``plugins.py bare-plugin 4``);
* our host → ``go-plugin-trivial``, beside
* the bare grpcio host (``bare.py``, ``BareHost``) → ``go-plugin-trivial``;
* Go host ⇄ ``go-plugin-trivial``, what the wire allows.

The Go host is ``go-host-driver``: its ``checks_per_s`` (N over the time from
the first call to the last verdict) and ``cold_first_ms`` (its warm-up
check, plugin launch included). Our host and the bare host are timed the
same way, in this process: a fresh host, the first check's verdict (launch
included), then all N enqueued at once and awaited. Our host runs its
plugin with a ``check_timeout`` of ``CHECK_TIMEOUT``: a check whose answer
is lost then fails, is counted, and flags the pairing's verdicts, instead of
holding the whole run.

``go-backend``: backend-bound throughput. The policy is luci's example
plugin's (deny ``experimental/``, else admit if an ``allowed-sha256``
entry is the instance's digest), over the Go driver's pins (every 10th
``experimental/``), with a repository answering after each latency, for:

* Go host → our SDK plugin (``tests/plugins/go_peer_plugin.py example``;
  the driver's ``-allow-md -md-latency``);
* our host → ``go-example-plugin`` (``repositories.DigestRepository`` in
  this process, sleeping per call, concurrently);
* our host → our SDK plugin;
* our host with ``PrpcRepository`` → ``go-example-plugin``, the backend a
  local pRPC server in a process of its own (``repositories.PrpcDigestServer``)
  with the latency;
* Go host ⇄ ``go-example-plugin``, the reference.

Each reports pins/s, the ratio of each latency's figure to its own 0 ms
figure, and the peak of ListMetadata calls in flight.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import psutil

from benchmarks.bare import bare_host_burst, measure_burst
from benchmarks.repositories import DigestRepository, PrpcDigestServer
from benchmarks.results import BenchmarkError, Measurement, Results, Target, log
from cipdplugin import AdmissionDenied, Config, Host, Pin, PrpcRepository, RepositoryClient
from tests import go_anchors
from tests.go_anchors import DRIVER_WARM_UP, GO_SERVICE_URL, DriverError, driver_pins, go_binary, run_driver

BENCH_DIR = Path(__file__).resolve().parent
SDK_PLUGIN = [sys.executable, str(BENCH_DIR / "plugins.py"), "admit"]
BARE_PLUGIN = [sys.executable, str(BENCH_DIR / "plugins.py"), "bare-plugin", "4"]
SDK_EXAMPLE_PLUGIN = go_anchors.peer_plugin_cmd("example")
#: Bound on every verdict awaited, so that a broken run fails instead of hanging.
WAIT_LIMIT = 300.0
#: Our host's ``check_timeout``: a check whose answer is lost fails after
#: this long (and is counted as failed) instead of holding the run.
CHECK_TIMEOUT = 15.0
#: Every 10th pin of the backend-bound runs is ``experimental/``, denied by name.
DENY_EVERY = 10
DENY_PREFIX = "experimental/pkg/"

#: Targets, printed as verdicts (never asserted).
TARGET_STEADY_VS_BARE = 1.0
TARGET_HIDDEN = {0.020: 0.8, 0.100: 0.5}

STEADY_PAIRS = (
    ("go-host.our-sdk", "go-host.bare-plugin"),
    ("our-host.go-plugin", "bare-host.go-plugin"),
)
STEADY_REFERENCE = "go-host.go-plugin"
BACKEND_PAIRINGS = (
    "go-host.our-sdk",
    "our-host.go-plugin",
    "our-host.our-sdk",
    "our-host-prpc.go-plugin",
)
BACKEND_REFERENCE = "go-host.go-plugin"


def unavailable() -> str | None:
    """Why these sections cannot run here, or None."""
    if go_anchors.missing_binaries():
        return go_anchors.missing_reason()
    return None


# -- Runs ----------------------------------------------------------------------------


def driver_run(plugin: list[str], count: int, *flags: str, admitted: int | None = None) -> dict[str, float]:
    """One go-host-driver run; its rate, cold first verdict and metadata
    figures, and how many checks failed (errors, or verdicts not the policy's)."""
    try:
        run = run_driver(plugin, "-n", str(count), *flags, timeout=WAIT_LIMIT)
    except DriverError as exc:
        raise BenchmarkError(str(exc)) from None
    expected = count if admitted is None else admitted
    failed = run["errors"] + run["mismatches"] + abs(run["admitted"] - expected)
    if failed:
        log(f"    {failed} checks failed: {run.report}\n{run.stderr.strip()[-2000:]}")
    return {
        "seconds": count / run["checks_per_s"],
        "cold_first_seconds": run["cold_first_ms"] / 1000,
        "metadata_calls": float(run["metadata_calls"]),
        "peak_in_flight": float(run["max_concurrent_md"]),
        "failed_checks": float(failed),
    }


def our_host_run(
    plugin: list[str], pins: list[Pin], repository: RepositoryClient | None = None, *, admitted: int
) -> dict[str, float]:
    """A fresh Host driving ``plugin``: the first check's verdict (launch
    included), then every pin enqueued at once and awaited. A check the
    plugin never answers fails after ``CHECK_TIMEOUT``, and counts as failed."""
    host = Host(Config(GO_SERVICE_URL, repository))
    try:
        checker = host.new_admission_plugin(plugin, check_timeout=CHECK_TIMEOUT)
        start = time.perf_counter()
        if settle([checker.check_admission(DRIVER_WARM_UP)], 1):
            raise BenchmarkError(f"{plugin[-1]} did not admit its first check")
        cold = time.perf_counter() - start
        figures = measure_burst(
            lambda: settle([checker.check_admission(pin) for pin in pins], admitted),
            psutil.Process().children(),
            len(pins),
        )
    finally:
        host.close()
    return figures | {"cold_first_seconds": cold}


def settle(promises: list[Future[None]], admitted: int) -> int:
    """Wait for every promise; how many failed. Only ``admitted`` admissions
    and the policy's denials are expected; any other error is a failure,
    counted and logged (the first few), not raised: a pairing that loses
    checks is measured and shown as such."""
    admissions, failures = 0, []
    for promise in promises:
        error = promise.exception(timeout=WAIT_LIMIT)
        if error is None:
            admissions += 1
        elif not isinstance(error, AdmissionDenied):
            failures.append(error)
    for error in failures[:3]:
        log(f"    a check failed: {error!r}")
    return max(len(failures), abs(admissions - admitted))


# -- go-steady ------------------------------------------------------------------------


def measure_steady(results: Results, *, size: int, repeat: int) -> None:
    pins = driver_pins(size)
    trivial = [go_binary("go-plugin-trivial")]
    runs: dict[str, Callable[[], dict[str, float]]] = {
        "go-host.our-sdk": lambda: driver_run(SDK_PLUGIN, size, "-expect", "admit"),
        "go-host.bare-plugin": lambda: driver_run(BARE_PLUGIN, size, "-expect", "admit"),
        "our-host.go-plugin": lambda: our_host_run(trivial, pins, admitted=size),
        "bare-host.go-plugin": lambda: bare_host_burst(GO_SERVICE_URL, trivial, pins, DRIVER_WARM_UP),
        STEADY_REFERENCE: lambda: driver_run(trivial, size, "-expect", "admit"),
    }
    # One untimed round: every program is then in the page cache.
    for run in runs.values():
        run()
    for repetition in range(repeat):
        order: list[str] = []
        for ours, bare in STEADY_PAIRS:
            order += [ours, bare] if repetition % 2 == 0 else [bare, ours]
        order.append(STEADY_REFERENCE)
        for name in order:
            details = runs[name]()
            rate = size / details["seconds"]
            results.get(f"go_steady.{name}.{size}", "checks/s").add(rate, **details)
            results.get(f"go_steady.{name}.cold_first", "s").add(details["cold_first_seconds"])
            log(
                f"  {size:>6} checks  {name:<22} rep {repetition + 1}: {rate:8.0f} checks/s, "
                f"first verdict {details['cold_first_seconds'] * 1e3:.0f} ms"
                + (f", {details['failed_checks']:.0f} checks FAILED" if details["failed_checks"] else "")
            )


def judge_steady(results: Results, size: int) -> None:
    names = [name for pair in STEADY_PAIRS for name in pair] + [STEADY_REFERENCE]
    if not all(results.has(f"go_steady.{name}.{size}") for name in names):
        return
    figures = {name: results.measurements[f"go_steady.{name}.{size}"] for name in names}
    reference = figures[STEADY_REFERENCE].median
    for ours, bare in STEADY_PAIRS:
        paired = statistics.median(
            a / b for a, b in zip(figures[ours].values, figures[bare].values, strict=True)
        )
        lost = failed_checks(figures[ours]) + failed_checks(figures[bare])
        results.targets.append(
            Target(
                f"steady, {ours} vs {bare} (bare grpcio)",
                "ratio",
                paired,
                TARGET_STEADY_VS_BARE,
                paired >= TARGET_STEADY_VS_BARE and not lost,
                f"median of paired ratios; medians {figures[ours].median:.0f}/s "
                f"vs {figures[bare].median:.0f}/s" + (f"; {lost:.0f} checks FAILED" if lost else ""),
            )
        )
    lines = [
        f"steady throughput beside the Go client, {size} checks (medians of "
        f"{len(figures[STEADY_REFERENCE].values)}):",
        f"  {'pairing':<22} {'checks/s':>9} {'/ Go⇄Go':>8} {'first verdict':>14}",
    ]
    for name in names:
        cold = results.measurements[f"go_steady.{name}.cold_first"].median
        lost = failed_checks(figures[name])
        lines.append(
            f"  {name:<22} {figures[name].median:>9,.0f} {figures[name].median / reference:>7.2f}x "
            f"{cold * 1e3:>11.1f} ms" + (f"  ({lost:.0f} checks failed)" if lost else "")
        )
    results.notes["go_steady"] = {
        "summary": "\n".join(lines),
        "ratios_to_go": {name: figures[name].median / reference for name in names},
    }


# -- go-backend ----------------------------------------------------------------------


def measure_backend(results: Results, *, size: int, latencies: tuple[float, ...], repeat: int) -> None:
    pins = driver_pins(size, DENY_EVERY, DENY_PREFIX)
    admitted = size - size // DENY_EVERY
    example = [go_binary("go-example-plugin")]

    def driver_flags(latency: float) -> list[str]:
        flags = ["-allow-md", "-deny-every", str(DENY_EVERY), "-deny-prefix", DENY_PREFIX, "-expect", "admit"]
        return [*flags, "-md-latency", f"{latency * 1000:g}ms"] if latency > 0 else flags

    def ours(plugin: list[str], latency: float) -> dict[str, float]:
        repository = DigestRepository(latency)
        details = our_host_run(plugin, pins, repository, admitted=admitted)
        return details | {
            "metadata_calls": float(repository.calls),
            "peak_in_flight": float(repository.peak_in_flight),
        }

    def ours_prpc(latency: float) -> dict[str, float]:
        server = PrpcDigestServer(latency)
        repository = PrpcRepository(server.url, timeout=60.0)
        try:
            details = our_host_run(example, pins, repository, admitted=admitted)
        finally:
            repository.close()
            counters = server.close()
        return details | {
            "metadata_calls": float(counters["calls"]),
            "peak_in_flight": float(counters["peak_in_flight"]),
        }

    runs: dict[str, Callable[[float], dict[str, float]]] = {
        BACKEND_REFERENCE: lambda latency: driver_run(
            example, size, *driver_flags(latency), admitted=admitted
        ),
        "go-host.our-sdk": lambda latency: driver_run(
            SDK_EXAMPLE_PLUGIN, size, *driver_flags(latency), admitted=admitted
        ),
        "our-host.go-plugin": lambda latency: ours(example, latency),
        "our-host.our-sdk": lambda latency: ours(SDK_EXAMPLE_PLUGIN, latency),
        "our-host-prpc.go-plugin": ours_prpc,
    }
    names = list(runs)
    for run in runs.values():  # untimed: the page cache, and grpc's first use
        run(0.0)
    for repetition in range(repeat):
        for latency in latencies:
            # The reference first, then ours in an order that turns each repetition.
            turn = repetition % (len(names) - 1)
            order = [names[0], *names[1 + turn :], *names[1 : 1 + turn]]
            for name in order:
                details = runs[name](latency)
                rate = size / details["seconds"]
                results.get(backend_name(name, latency, size), "checks/s").add(rate, **details)
                log(
                    f"  {size} pins at {latency * 1000:>3g} ms  {name:<24} rep {repetition + 1}: "
                    f"{rate:7.0f} pins/s, peak {details['peak_in_flight']:.0f} ListMetadata in flight"
                    + (f", {details['failed_checks']:.0f} checks FAILED" if details["failed_checks"] else "")
                )


def failed_checks(measurement: Measurement) -> float:
    """Checks that failed over every repetition of a figure."""
    return sum(details.get("failed_checks", 0.0) for details in measurement.details)


def backend_name(pairing: str, latency: float, size: int) -> str:
    return f"go_backend.{pairing}.{latency * 1000:g}ms.{size}"


def judge_backend(results: Results, size: int, latencies: tuple[float, ...]) -> None:
    names = [BACKEND_REFERENCE, *BACKEND_PAIRINGS]
    if not all(results.has(backend_name(name, latency, size)) for name in names for latency in latencies):
        return

    def median(name: str, latency: float) -> float:
        return results.measurements[backend_name(name, latency, size)].median

    def peak(name: str, latency: float) -> float:
        return results.measurements[backend_name(name, latency, size)].median_detail("peak_in_flight")

    def lost_at(name: str, latency: float) -> float:
        return failed_checks(results.measurements[backend_name(name, latency, size)])

    slow = [latency for latency in latencies if latency > 0]
    for name in BACKEND_PAIRINGS:  # the Go reference is shown, not judged
        for latency in slow:
            bound = TARGET_HIDDEN.get(latency)
            if bound is None:
                continue
            ratio = median(name, latency) / median(name, 0.0)
            lost = lost_at(name, latency) + lost_at(name, 0.0)
            results.targets.append(
                Target(
                    f"backend-bound, {name}, {latency * 1000:g} ms vs 0 ms",
                    "ratio",
                    ratio,
                    bound,
                    ratio >= bound and not lost,
                    f"{median(name, latency):.0f} vs {median(name, 0.0):.0f} pins/s; "
                    f"peak {peak(name, latency):.0f} ListMetadata in flight"
                    + (f"; {lost:.0f} checks FAILED" if lost else ""),
                )
            )
    header = f"  {'pairing':<24}" + "".join(f" {f'{latency * 1000:g} ms':>10}" for latency in latencies)
    header += "".join(f" {f'{latency * 1000:g}/0':>7}" for latency in slow)
    header += "".join(f" {f'peak@{latency * 1000:g}':>8}" for latency in slow)
    header += "".join(f" {f'/Go@{latency * 1000:g}':>8}" for latency in slow)
    lines = [
        f"backend-bound throughput beside the Go client, {size} pins (allowed-sha256 policy), pins/s, "
        "medians; peak = ListMetadata calls in flight:",
        header,
    ]
    for name in names:
        line = f"  {name:<24}" + "".join(f" {median(name, latency):>10,.0f}" for latency in latencies)
        line += "".join(f" {median(name, latency) / median(name, 0.0):>6.2f}x" for latency in slow)
        line += "".join(f" {peak(name, latency):>8.0f}" for latency in slow)
        line += "".join(
            f" {median(name, latency) / median(BACKEND_REFERENCE, latency):>7.2f}x" for latency in slow
        )
        lost = sum(lost_at(name, latency) for latency in latencies)
        lines.append(line + (f"  ({lost:.0f} checks failed)" if lost else ""))
    results.notes["go_backend"] = {"summary": "\n".join(lines)}
