"""Hostile plugins: raw gRPC clients that skip or forge tickets, send garbage,
break the protocol, or meddle with another plugin's admissions.

The host must answer each with the right status code, and keep serving
every other plugin: each test has a well-behaved plugin on the same host
answer checks before and after.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cipdplugin import (
    AdmissionDenied,
    Config,
    Host,
    PluginAbortedError,
    PluginStartError,
    StaticRepository,
)
from cipdplugin.host import PluginState
from tests.conftest import (
    REPO_ROOT,
    SERVICE_URL,
    ResourceSnapshot,
    assert_no_leaks,
    hex_id,
    plugin_cmd,
    wait_until,
)

HOSTILE_PLUGIN = REPO_ROOT / "tests" / "plugins" / "hostile.py"
METHODS = ("Log", "ListMetadata", "ListAdmissions", "ResolveAdmission")

HostFactory = Callable[..., Host]


def hostile_cmd(mode: str, *args: str) -> list[str]:
    return [sys.executable, str(HOSTILE_PLUGIN), mode, *args]


def pin(n: int, package: str = "test/pkg") -> str:
    return f"{package}:{hex_id(n)}"


def read_result(path: Path) -> dict[str, Any]:
    """The hostile plugin's report, once it has written it."""
    assert wait_until(path.exists, 30), f"the hostile plugin wrote no {path.name}"
    result: dict[str, Any] = json.loads(path.read_text())
    return result


_warmed_up = False


def resource_baseline() -> ResourceSnapshot:
    """Resources in use after one full host cycle (gRPC's global setup is not a leak).

    The cycle includes malformed requests: gRPC's server sets up two event
    pollers (four descriptors) on its first undecodable request and keeps
    them for the life of the process.
    """
    global _warmed_up
    if not _warmed_up:
        with Host(Config(SERVICE_URL, StaticRepository())) as host:
            plugin = host.new_admission_plugin(hostile_cmd("malformed"))
            plugin.check_admission(pin(0)).result(60)
        _warmed_up = True
    return ResourceSnapshot()


@pytest.fixture(autouse=True)
def quiet_grpc(caplog: pytest.LogCaptureFixture) -> None:
    # gRPC logs each undecodable request with a traceback: expected here.
    caplog.set_level("CRITICAL", logger="grpc")


def test_tickets_garbage_and_protocol_abuse(make_host: HostFactory, tmp_path: Path) -> None:
    before = resource_baseline()
    host = make_host()
    good = host.new_admission_plugin(plugin_cmd("admit"))
    assert good.check_admission(pin(1)).result(timeout=30) is None

    report = tmp_path / "probe.json"
    hostile = host.new_admission_plugin(hostile_cmd("probe", str(report)))
    # The probe resolves this check from its real stream, after its abuse.
    assert hostile.check_admission(pin(2)).result(timeout=30) is None
    codes = read_result(report)

    for method in METHODS:
        assert codes[f"{method} no-ticket"] == "UNAUTHENTICATED", method
        assert codes[f"{method} wrong-ticket"] == "PERMISSION_DENIED", method
        # 64 random bytes in base64: shaped like a real ticket, but no plugin's.
        assert codes[f"{method} forged-ticket"] == "PERMISSION_DENIED", method
        for garbage in ("truncated", "bad-wire-type", "overlong-varint"):
            assert codes[f"{method} {garbage}"] == "INTERNAL", (method, garbage)
        assert codes[f"{method} oversized"] == "RESOURCE_EXHAUSTED", method
    assert codes["ListMetadata other-service"] == "PERMISSION_DENIED"
    assert codes["ResolveAdmission unknown-id"] == "OK"
    assert codes["Log after-garbage"] == "OK"  # Garbage did not cost it its ticket.
    assert codes["ListAdmissions second"] == "FAILED_PRECONDITION"
    assert codes["ResolveAdmission own"] == "OK"
    assert codes["first-package"] == "test/pkg"

    # Its first stream still works, and so does everyone else's.
    assert hostile.check_admission(pin(3)).result(timeout=30) is None
    assert hostile.state is PluginState.CONNECTED
    assert good.check_admission(pin(4)).result(timeout=30) is None
    assert good.check_admission("deny/pkg:" + hex_id(5)).exception(timeout=30) is not None
    host.close()
    assert_no_leaks(before)


def test_wrong_protocol_version(make_host: HostFactory, tmp_path: Path) -> None:
    before = resource_baseline()
    host = make_host()
    good = host.new_admission_plugin(plugin_cmd("admit"))
    assert good.check_admission(pin(1)).result(timeout=30) is None

    report = tmp_path / "version.json"
    hostile = host.new_admission_plugin(hostile_cmd("wrong-version", str(report)))
    checks = [hostile.check_admission(pin(n)) for n in range(2, 5)]
    for check in checks:
        error = check.exception(timeout=30)
        assert isinstance(error, PluginStartError)
        assert "protocol version 2" in error.message
    codes = read_result(report)
    assert codes["ListAdmissions version-2"] == "FAILED_PRECONDITION"
    # Its ticket was forgotten at once.
    assert codes["Log after"] == "PERMISSION_DENIED"
    # Its stdin was closed: it leaves on its own, long before any close().
    assert wait_until(lambda: not _running_with(str(report)), 10)
    assert isinstance(hostile.check_admission(pin(9)).exception(timeout=0), PluginStartError)

    assert good.check_admission(pin(6)).result(timeout=30) is None
    host.close()
    assert_no_leaks(before)


def test_forged_resolutions_do_not_reach_another_plugin(make_host: HostFactory, tmp_path: Path) -> None:
    """Admission IDs are guessable (public rule, host pid as salt); tickets are not."""
    before = resource_baseline()
    host = make_host()
    # The victim never answers on its own, so nothing but a forgery could settle its checks.
    victim = host.new_admission_plugin(plugin_cmd("stuck-handler"))
    victim_pins = [pin(n) for n in range(1, 4)]
    victim_checks = [victim.check_admission(p) for p in victim_pins]
    assert wait_until(lambda: victim.state is PluginState.CONNECTED, 30)

    report = tmp_path / "forge.json"
    forger = host.new_admission_plugin(hostile_cmd("forge", str(report), SERVICE_URL, *victim_pins))
    # The forger was asked about the victim's first pin as well: same ID on
    # this host, but each plugin has its own, and the forgery settles only the forger's.
    forger_same_pin = forger.check_admission(victim_pins[0])
    forger_own = forger.check_admission(pin(10))
    codes = read_result(report)
    # Unknown IDs are ignored without an error: nothing to learn from the answer.
    assert set(codes.values()) == {"OK"}
    same_pin_error = forger_same_pin.exception(timeout=30)
    assert isinstance(same_pin_error, AdmissionDenied)
    assert "forged" in same_pin_error.message
    assert forger_own.result(timeout=30) is None

    assert not any(check.done() for check in victim_checks)
    victim.close()
    for check in victim_checks:
        error = check.exception(timeout=0)
        assert isinstance(error, PluginAbortedError)
        assert "forged" not in error.message

    bystander = host.new_admission_plugin(plugin_cmd("admit"))
    assert bystander.check_admission(pin(20)).result(timeout=30) is None
    assert forger.check_admission(pin(21)).result(timeout=30) is None
    host.close()
    assert_no_leaks(before)


def _running_with(marker: str) -> bool:
    import psutil

    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and marker in " ".join(process.cmdline()):
                return True
        except psutil.Error:
            pass
    return False
