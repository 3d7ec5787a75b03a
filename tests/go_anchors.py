"""The Go CIPD client's plugin binaries, for the interop tests and the benchmarks.

They live outside the repository, in ``../shared/anchors/bin`` beside it
(that folder's README gives their flags and output). A clone without that
folder has none of them: ``missing_binaries()`` says which are absent, and
the tests skip with a reason naming the folder, unless ``REQUIRE_ENV`` is set
(CI sets it, so that there they fail instead).

Nothing here imports the host side or pytest: benchmarks use it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cipdplugin.pins import Pin

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The folder as users see it named, relative to the repository.
GO_BIN_NAME = "../shared/anchors/bin"
GO_BIN = REPO_ROOT.parent / "shared" / "anchors" / "bin"
BINARIES = ("go-host-driver", "go-plugin-trivial", "go-example-plugin", "go-rpc-probe-plugin")
#: Set (to anything but empty) to make a missing binary fail the tests instead of skipping them.
REQUIRE_ENV = "CIPDPLUGIN_REQUIRE_GO_BINARIES"
#: The Go host driver's default Config.ServiceURL.
GO_SERVICE_URL = "https://chrome-infra-packages.appspot.com"
GO_PEER_PLUGIN = REPO_ROOT / "tests" / "plugins" / "go_peer_plugin.py"

#: What luci's plugins answer (the anchors README; go_peer_plugin.py says the same).
BAD_PACKAGE = "bad package"
EXPERIMENTAL = "experimental packages are not allowed"
NO_ENTRIES = 'doesn\'t have metadata entries with key "allowed-sha256"'

#: A probe line of go-rpc-probe-plugin: ``probe <name> <Go codes.Code>``.
PROBE_LINE = re.compile(r"probe (\S+) (\S+)")
#: The Go host's answer to each probe (the anchors README's table): without a
#: repository, and with one.
GO_PROBE_TABLE: dict[str, tuple[str, str]] = {
    "Log.no_ticket": ("Unauthenticated", "Unauthenticated"),
    "Log.wrong_ticket": ("PermissionDenied", "PermissionDenied"),
    "Log.right_ticket": ("OK", "OK"),
    "ListMetadata.wrong_service_url": ("Unimplemented", "PermissionDenied"),
    "ListAdmissions.protocol_version_1": ("OK", "OK"),
    "ListAdmissions.second": ("FailedPrecondition", "FailedPrecondition"),
    "ResolveAdmission.unknown_id": ("OK", "OK"),
    "ListAdmissions.protocol_version_2": ("FailedPrecondition", "FailedPrecondition"),
}


def missing_binaries() -> list[str]:
    """The binaries absent from ``GO_BIN`` (or not executable)."""
    return [name for name in BINARIES if not os.access(GO_BIN / name, os.X_OK)]


def missing_reason() -> str:
    return (
        f"the Go CIPD binaries are not in {GO_BIN_NAME} beside the repository "
        f"(missing: {', '.join(missing_binaries())}); see that folder's README"
    )


def go_binary(name: str) -> str:
    """The path of one binary, as a command-line word."""
    return str(GO_BIN / name)


def peer_plugin_cmd(mode: str, *args: str) -> list[str]:
    """Our SDK doing what a luci plugin does (tests/plugins/go_peer_plugin.py)."""
    return [sys.executable, str(GO_PEER_PLUGIN), mode, *args]


def driver_instance_id(index: int) -> str:
    """The instance ID of the Go driver's pin ``index`` (-1 is its warm-up pin)."""
    digest = hashlib.sha256(f"go-host-driver instance {index}".encode()).digest()
    return base64.urlsafe_b64encode(digest + b"\x02").decode("ascii").rstrip("=")


def driver_pins(count: int, deny_every: int = 0, deny_prefix: str = "bad/pkg/") -> list[Pin]:
    """The pins ``go-host-driver -n COUNT -deny-every K -deny-prefix P`` checks, in order (no warm-up)."""
    pins = []
    for index in range(count):
        denied = deny_every > 0 and index % deny_every == deny_every - 1
        package = f"{deny_prefix}{index}" if denied else f"good/pkg/{index}"
        pins.append(Pin(package, driver_instance_id(index)))
    return pins


#: The Go driver's warm-up pin, checked before the others.
DRIVER_WARM_UP = Pin("good/warm-up", driver_instance_id(-1))


@dataclass(frozen=True)
class DriverRun:
    """One run of go-host-driver: its JSON report, its stderr and how it ended."""

    report: dict[str, Any]
    stderr: str
    returncode: int
    pid: int
    seconds: float

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    def probes(self) -> dict[str, str]:
        """The probe lines of go-rpc-probe-plugin, which shares the driver's stderr."""
        return dict(PROBE_LINE.findall(self.stderr))


def _text(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")


class DriverError(RuntimeError):
    """go-host-driver printed no report (a usage error, a crash, a timeout)."""


def run_driver(plugin: list[str], *flags: str, timeout: float = 120.0) -> DriverRun:
    """Run ``go-host-driver -json FLAGS -- PLUGIN...`` to its end.

    Raises:
        DriverError: it printed no JSON report, or did not end within ``timeout``.
    """
    command = [go_binary("go-host-driver"), "-json", *flags, "--", *plugin]
    # Files, not pipes: a plugin the driver leaves behind would hold a pipe
    # open, and reading it to its end would wait for that plugin.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise DriverError(
                f"go-host-driver did not finish in {timeout} s; stderr:\n{_text(err)}"
            ) from None
        seconds = time.monotonic() - started
        stdout, stderr = _text(out), _text(err)
    lines = stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise DriverError(
            f"go-host-driver exited {process.returncode} without a report; stderr:\n{stderr}"
        ) from None
    return DriverRun(report, stderr, process.returncode, process.pid, seconds)
