"""Shared fixtures: the test plugin's command line, hosts that always close,
and a check that nothing (threads, descriptors, child processes) leaks."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cipdplugin import Config, Host, StaticRepository
from tests.prpc_backend import PrpcBackend, TLSFiles, make_tls_files

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_PLUGIN = REPO_ROOT / "tests" / "plugins" / "admission_plugin.py"
SERVICE_URL = "https://cipd.example.com"

#: Valid instance IDs for tests: SHA-1 (hex) and SHA-256 (base64) forms.
SHA1_ID = "a" * 40
SHA256_ID = "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4kC"


def plugin_cmd(mode: str, *args: str) -> list[str]:
    """The command line of the test plugin in ``mode``."""
    return [sys.executable, str(TEST_PLUGIN), mode, *args]


def hex_id(n: int) -> str:
    """A distinct valid SHA-1 instance ID for each ``n``."""
    return f"{n:040x}"


@pytest.fixture
def make_host() -> Iterator[Callable[..., Host]]:
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
