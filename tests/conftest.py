"""Shared helpers and fixtures of every test layer: the test plugins' command
lines, hosts that always close, log records, the hostile plugins' reports,
and the check that nothing (threads, descriptors, child processes) leaks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cipdplugin import Config, Host, ListMetadataRequest, ListMetadataResponse, StaticRepository
from tests import go_anchors
from tests.prpc_backend import PrpcBackend, TLSFiles, make_tls_files

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_PLUGIN = REPO_ROOT / "tests" / "plugins" / "admission_plugin.py"
HOST_PROGRAM = REPO_ROOT / "tests" / "plugins" / "host_program.py"
GENERIC_PLUGIN = REPO_ROOT / "tests" / "plugins" / "generic_plugin.py"
HOSTILE_PLUGIN = REPO_ROOT / "tests" / "plugins" / "hostile.py"
SERVICE_URL = "https://cipd.example.com"

#: Valid instance IDs for tests: SHA-1 (hex) and SHA-256 (base64) forms.
SHA1_ID = "a" * 40
SHA256_ID = "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4kC"


def plugin_cmd(mode: str, *args: str) -> list[str]:
    """The command line of the test plugin in ``mode``."""
    return [sys.executable, str(TEST_PLUGIN), mode, *args]


#: What "promptly" means for a close, on top of the deadline it is given: the
#: SIGKILL settling time and the server's stop, plus room for a busy machine.
CLOSE_MARGIN = 2.0


def timed(action: Callable[[], object]) -> float:
    """How long ``action`` took, for the few tests whose point is a bound."""
    start = time.monotonic()
    action()
    return time.monotonic() - start


def generic_cmd(mode: str, *args: str) -> list[str]:
    """The command line of the generic (not admission) test plugin in ``mode``."""
    return [sys.executable, str(GENERIC_PLUGIN), mode, *args]


def hostile_cmd(mode: str, *args: str) -> list[str]:
    """The command line of a hostile raw-gRPC plugin in ``mode``."""
    return [sys.executable, str(HOSTILE_PLUGIN), mode, *args]


def pin(n: int, package: str = "test/pkg") -> str:
    """A distinct valid pin string for each ``n``."""
    return f"{package}:{hex_id(n)}"


def read_result(path: Path) -> dict[str, Any]:
    """A hostile plugin's report, once it has written it."""
    assert wait_until(path.exists, 30), f"the plugin wrote no {path.name}"
    result: dict[str, Any] = json.loads(path.read_text())
    return result


class FailingRepository:
    """A metadata repository whose every call raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        raise self.error


def run_host_program(mode: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``tests/plugins/host_program.py MODE`` in its own interpreter; its JSON report."""
    done = subprocess.run(
        [sys.executable, str(HOST_PROGRAM), mode],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


def hex_id(n: int) -> str:
    """A distinct valid SHA-1 instance ID for each ``n``."""
    return f"{n:040x}"


#: The type of the ``make_host`` fixture.
HostFactory = Callable[..., Host]


@pytest.fixture
def make_host() -> Iterator[HostFactory]:
    """Make hosts that are closed when the test ends, whatever happens."""
    hosts: list[Host] = []

    def make(config: Config | None = None, **kwargs: object) -> Host:
        host = Host(config if config is not None else Config(SERVICE_URL, StaticRepository()), **kwargs)  # type: ignore[arg-type]
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.close()


def children() -> list[psutil.Process]:
    """This process's live descendants (zombies included)."""
    return psutil.Process().children(recursive=True)


def zombies() -> list[psutil.Process]:
    found = []
    for child in children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            pass
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; return the last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class ResourceSnapshot:
    """Threads, open descriptors and children of this process at one moment."""

    def __init__(self) -> None:
        self.threads = {t.ident for t in threading.enumerate()}
        self.fds = set(os.listdir("/proc/self/fd"))
        self.children = {p.pid for p in children()}

    def leaked_since(self, before: ResourceSnapshot) -> dict[str, object]:
        """What exists now and did not before (threads by name)."""
        leaks: dict[str, object] = {}
        new_threads = [t.name for t in threading.enumerate() if t.ident not in before.threads]
        if new_threads:
            leaks["threads"] = new_threads
        if self.fds - before.fds:
            leaks["fds"] = sorted(self.fds - before.fds)
        if self.children - before.children:
            leaks["children"] = sorted(self.children - before.children)
        return leaks


def assert_no_leaks(before: ResourceSnapshot, timeout: float = 5.0) -> None:
    """Fail unless threads, descriptors and children return to ``before``."""
    leaks: dict[str, object] = {}

    def settled() -> bool:
        nonlocal leaks
        leaks = ResourceSnapshot().leaked_since(before)
        return not leaks

    assert wait_until(settled, timeout), f"resources leaked: {leaks}"


# -- A pRPC CIPD backend (tests/prpc_backend.py) --------------------------------


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A test CA and a server certificate for 127.0.0.1; skips without openssl."""
    try:
        return make_tls_files(tmp_path_factory.mktemp("tls"))
    except RuntimeError as exc:
        pytest.skip(f"no TLS test certificates: {exc}")


@pytest.fixture
def make_backend() -> Iterator[Callable[..., PrpcBackend]]:
    """Start pRPC backends (``PrpcBackend`` arguments) that stop when the test ends."""
    backends: list[PrpcBackend] = []

    def make(repository: StaticRepository | None = None, **kwargs: Any) -> PrpcBackend:
        backend = PrpcBackend(repository if repository is not None else StaticRepository(), **kwargs)
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


_warmed_up = False


@pytest.fixture
def baseline() -> ResourceSnapshot:
    """Resources in use after one full host cycle has run in this process.

    gRPC sets up process-wide resources (threads, descriptors) on first use
    and keeps them; only what a host adds after that is a leak. The cycle
    includes undecodable requests: gRPC's server sets up two event pollers
    (four descriptors) on the first one and keeps them for good.
    """
    global _warmed_up
    if not _warmed_up:
        with Host(Config(SERVICE_URL, StaticRepository())) as host:
            plugin = host.new_admission_plugin(hostile_cmd("malformed"))
            plugin.check_admission(pin(0)).result(60)
        _warmed_up = True
    return ResourceSnapshot()


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def plugin_pids(marker: str) -> set[int]:
    """Pids of our running descendants whose command line contains ``marker``."""
    found = set()
    for process in children():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and any(marker in part for part in process.cmdline()):
                found.add(process.pid)
        except psutil.Error:
            pass
    return found


def assert_all_gone(pids: set[int], timeout: float = 5.0) -> None:
    """Every pid has exited: gone, or a zombie left to init (not our child)."""
    assert wait_until(lambda: not any(running(pid) for pid in pids), timeout), [p for p in pids if running(p)]
    assert not zombies()


class Records(logging.Handler):
    """Collects the records of a logger of its own, kept out of the test report."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(f"cipdplugin.test-{id(self)}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in list(self.records)]

    def count(self, text: str) -> int:
        return sum(text in message for _, message in self.messages())

    def wait_for(self, text: str, timeout: float = 10.0) -> bool:
        return wait_until(lambda: self.count(text) > 0, timeout)


@pytest.fixture
def records() -> Iterator[Records]:
    """What the hosts of ``logged_host`` log."""
    handler = Records()
    yield handler
    handler.logger.removeHandler(handler)


@pytest.fixture
def logged_host(make_host: Callable[..., Host], records: Records) -> Callable[..., Host]:
    """Make hosts that log to ``records``."""

    def make(config: Config | None = None, **kwargs: object) -> Host:
        return make_host(config, logger=records.logger, **kwargs)

    return make


# -- The Go CIPD client's binaries (tests/go_anchors.py) ---------------------------


@pytest.fixture(scope="session")
def go_binaries() -> None:
    """Skip unless the Go binaries are in ../shared/anchors/bin; fail instead where CI requires them."""
    if go_anchors.missing_binaries():
        if os.environ.get(go_anchors.REQUIRE_ENV):
            pytest.fail(f"{go_anchors.missing_reason()}; {go_anchors.REQUIRE_ENV} requires them")
        pytest.skip(go_anchors.missing_reason())
