"""Per-check deadlines (``check_timeout``) with real plugins that answer late or never."""

from __future__ import annotations

import collections
import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait

import grpc
import pytest

from cipdplugin import AdmissionError, Host, Pin, PluginAbortedError
from cipdplugin.host import HostFuture
from cipdplugin.host.deadlines import CheckDeadlines
from tests.conftest import ResourceSnapshot, assert_no_leaks, hex_id, hostile_cmd, plugin_cmd, wait_until

SILENT = Pin("silent/tool", hex_id(1))
OTHER = Pin("ok/tool", hex_id(2))


def test_a_check_never_answered_fails_with_deadline_exceeded_and_the_plugin_serves_on(
    make_host: Callable[..., Host],
) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("silent", "silent"), check_timeout=0.5)
    stuck = plugin.check_admission(SILENT)
    answered = plugin.check_admission(OTHER)
    assert answered.result(timeout=30) is None
    error = stuck.exception(timeout=30)
    assert type(error) is AdmissionError  # fail-closed, and not an abort: the plugin is fine
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "0.5 s check timeout" in error.message
    # The plugin keeps serving, and a timed-out check stays failed until clear_cache().
    assert plugin.check_admission(Pin("ok/later", hex_id(3))).result(timeout=30) is None
    assert plugin.check_admission(Pin("deny/later", hex_id(4))).exception(timeout=30) is not None
    assert plugin.check_admission(SILENT) is stuck


def test_a_late_answer_is_ignored_and_logged_at_debug(
    make_host: Callable[..., Host], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cipdplugin")
    plugin = make_host().new_admission_plugin(plugin_cmd("late", "1.0", "slow"), check_timeout=0.2)
    late = plugin.check_admission(Pin("slow/tool", hex_id(1)))
    error = late.exception(timeout=30)
    assert isinstance(error, AdmissionError) and error.code is grpc.StatusCode.DEADLINE_EXCEEDED

    def ignored() -> bool:
        return any("ignoring an answer" in record.getMessage() for record in caplog.records)

    assert wait_until(ignored, timeout=10), "the late answer was not logged"
    [record] = [r for r in caplog.records if "ignoring an answer" in r.getMessage()]
    assert record.levelno == logging.DEBUG
    assert late.exception(timeout=0) is error  # the late answer changed nothing
    assert plugin.check_admission(OTHER).result(timeout=30) is None


def test_the_deadline_counts_from_sending_not_from_queueing(make_host: Callable[..., Host]) -> None:
    # The checks wait in the queue for the plugin's slow connection, far
    # longer than the check timeout; once sent, they are answered at once.
    plugin = make_host().new_admission_plugin(plugin_cmd("slow-connect", "1.5"), check_timeout=0.5)
    futures = [plugin.check_admission(Pin("ok/tool", hex_id(i))) for i in range(20)]
    for future in futures:
        assert future.result(timeout=30) is None


def test_a_recheck_after_clear_cache_gets_a_fresh_deadline(make_host: Callable[..., Host]) -> None:
    # The same pin has the same admission ID each time: the deadline armed
    # for the first check must not fail the second one.
    plugin = make_host().new_admission_plugin(plugin_cmd("late", "1.0", "slow"), check_timeout=1.6)
    pin = Pin("slow/tool", hex_id(1))
    assert plugin.check_admission(OTHER).result(timeout=30) is None
    assert plugin.check_admission(pin).exception(timeout=30) is None
    plugin.clear_cache()
    # Sent about 1 s after the first: the first one's deadline passes while
    # the second is still being answered.
    assert plugin.check_admission(pin).result(timeout=30) is None


def test_close_fails_pending_checks_as_closed_and_stops_the_timer() -> None:
    before = ResourceSnapshot()
    host = Host()
    plugin = host.new_admission_plugin(plugin_cmd("silent", "silent"), check_timeout=60)
    stuck = plugin.check_admission(SILENT)
    assert plugin.check_admission(OTHER).result(timeout=30) is None
    host.close()
    assert isinstance(stuck.exception(timeout=0), PluginAbortedError)
    assert_no_leaks(before)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (True, TypeError),
    ],
)
def test_check_timeout_is_validated(
    make_host: Callable[..., Host], value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="check_timeout"):
        make_host().new_admission_plugin(plugin_cmd("admit"), check_timeout=value)  # type: ignore[arg-type]


def test_check_timeout_is_kept(make_host: Callable[..., Host]) -> None:
    host = make_host()
    assert host.new_admission_plugin(plugin_cmd("admit")).check_timeout is None
    assert host.new_admission_plugin(plugin_cmd("admit"), check_timeout=2).check_timeout == 2.0


def test_deadlines_fire_in_order_and_stop_ends_the_thread() -> None:
    fired: list[int] = []
    done = threading.Event()

    def expired(key: int) -> None:
        fired.append(key)
        if len(fired) == 3:
            done.set()

    deadlines = CheckDeadlines(0.05, expired, name="test")
    deadlines.arm([0, 1])
    deadlines.arm([2, 3])
    deadlines.disarm(3)  # answered: never fires, and is not kept
    assert len(deadlines) == 3
    assert done.wait(10)
    assert fired == [0, 1, 2] and len(deadlines) == 0
    deadlines.arm([99])
    deadlines.stop()  # forgets 99 before it is due
    deadlines.join(10)
    deadlines.arm([100])  # after stop: ignored
    assert fired == [0, 1, 2]
    assert not any(t.name == "cipdplugin-deadlines-test" for t in threading.enumerate())


def test_check_timeout_bounds_checks_behind_a_stream_the_plugin_stopped_reading(
    make_host: Callable[..., Host],
) -> None:
    """The plugin reads 100 checks, then stops reading its stream: the host
    cannot send the rest (gRPC's flow control holds them), and every one
    still fails within check_timeout of its queueing."""
    plugin = make_host().new_admission_plugin(hostile_cmd("stall", "100"), check_timeout=2)
    long_name = "/".join(["x" * 255] * 16)  # 4 KB, so that flow control soon holds the stream
    started = time.monotonic()
    checks = [plugin.check_admission(Pin(f"{long_name}/p{n}", hex_id(n))) for n in range(3000)]
    done, pending = wait(checks, timeout=10)
    assert not pending
    assert time.monotonic() - started < 2 + 5  # each check's deadline, and slack for a busy machine
    outcomes = collections.Counter(
        "admitted" if f.exception() is None else f.exception().code.name  # type: ignore[union-attr]
        for f in done
    )
    assert outcomes["admitted"] >= 100
    assert outcomes["admitted"] + outcomes["DEADLINE_EXCEEDED"] == 3000
    messages = {f.exception().message for f in done if f.exception() is not None}  # type: ignore[union-attr]
    assert all("check timeout" in message for message in messages)


def test_answered_checks_hold_nothing_in_the_deadline_keeper(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"), check_timeout=3600)
    checks = [plugin.check_admission(Pin("many/pkg", hex_id(n))) for n in range(20_000)]
    done, pending = wait(checks, timeout=120)
    assert not pending and all(f.exception() is None for f in done)
    deadlines = plugin._checks.deadlines  # the keeper itself: what it holds is the point
    assert deadlines is not None and len(deadlines) == 0
    del checks, done
    plugin.clear_cache()
    gc.collect()
    assert sum(isinstance(o, HostFuture) for o in gc.get_objects()) == 0
