"""What a Python plugin pays before its first verdict, beside a bare grpcio plugin.

Two figures, each taken in the same run as its floor (see benchmarks/README.md):

* import: a fresh interpreter importing the SDK
  (``cipdplugin.plugins.admission``) against one importing what any grpcio
  plugin must (``grpc``, ``google.protobuf.message``,
  ``google.rpc.status_pb2``), timed from the launch to the first byte the
  child writes after its imports;
* first verdict: from launching the plugin process to the host receiving
  the plugin's first ResolveAdmission, with an Admission already waiting on
  the stream, for the SDK's plugin (``plugins.py admit``) against the bare
  grpcio plugin (``plugins.py bare-peer``). The host is the same small grpcio
  server for both, so only the plugin side differs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.protocol import cipd_pb2, plugin_pb2
from tests.plain_grpc import protocol_handlers

PLUGINS = Path(__file__).resolve().parent / "plugins.py"
SDK_IMPORT = "import cipdplugin.plugins.admission"
FLOOR_IMPORT = "import grpc, google.protobuf.message, google.rpc.status_pb2"
#: Bound on every wait, so that a broken plugin fails the benchmark instead of hanging it.
WAIT_LIMIT = 60.0

_ADMISSION = plugin_pb2.Admission(
    admission_id="first",
    service_url="https://chrome-infra-packages.appspot.com",
    package="bench/startup",
    instance=cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA256, hex_digest="ab" * 32),
)


class StartupError(RuntimeError):
    """A start-up measurement could not be taken."""


def ready_seconds(command: list[str]) -> float:
    """Time from starting ``command`` to the first byte it writes to stdout."""
    start = time.perf_counter()
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        ready = process.stdout.read(1)
        elapsed = time.perf_counter() - start
        if process.wait(WAIT_LIMIT) != 0 or not ready:
            raise StartupError(f"{command} failed")
    return elapsed


def import_seconds(statement: str) -> float:
    """Launch to the first byte written after ``statement`` ran, in a fresh interpreter."""
    return ready_seconds([sys.executable, "-c", f"import os\n{statement}\nos.write(1, b'.')"])


class FirstVerdictHost:
    """A bare grpcio host that offers one Admission to each plugin it launches.

    One plugin at a time: ``first_verdict`` launches it, times its first
    ResolveAdmission, then ends its stream so that it exits. A deliberate
    independent baseline, as in bare.py: its handler table is written out
    here, so that the floor owes nothing to the library it is compared with.
    """

    def __init__(self) -> None:
        # Set when the current plugin resolves; the time it did so.
        self._resolved = threading.Event()
        self._resolved_at = 0.0  # written before _resolved is set, read after
        # Set to end the current plugin's stream.
        self._release = threading.Event()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(8, thread_name_prefix="startup-host"),
            handlers=protocol_handlers(
                list_admissions=self._list_admissions, resolve_admission=self._resolve_admission
            ),
            options=[("grpc.so_reuseport", 0)],
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _list_admissions(self, request: plugin_pb2.ListAdmissionsRequest, context: Any) -> Iterator[Any]:
        yield _ADMISSION
        self._release.wait(WAIT_LIMIT)  # Bounded: first_verdict sets it once timed.

    def _resolve_admission(self, request: plugin_pb2.ResolveAdmissionRequest, context: Any) -> Empty:
        if request.admission_id == _ADMISSION.admission_id and not self._resolved.is_set():
            self._resolved_at = time.perf_counter()
            self._resolved.set()
        return Empty()

    def first_verdict(self, kind: str) -> float:
        """Seconds from launching a ``kind`` plugin ("sdk" or "bare") to its first verdict."""
        self._resolved.clear()
        self._release.clear()
        if kind == "sdk":
            command = [sys.executable, str(PLUGINS), "admit"]
        else:
            command = [sys.executable, str(PLUGINS), "bare-peer", str(self.port), "0"]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdin=subprocess.PIPE)
        assert process.stdin is not None
        try:
            if kind == "sdk":
                process.stdin.write(json.dumps({"port": self.port, "ticket": "startup"}).encode() + b"\n")
                process.stdin.flush()
            if not self._resolved.wait(WAIT_LIMIT):
                raise StartupError(f"the {kind} plugin gave no verdict within {WAIT_LIMIT:g} s")
            return self._resolved_at - start
        finally:
            self._release.set()
            process.stdin.close()  # the SDK's stop signal
            try:
                process.wait(WAIT_LIMIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        self._release.set()
        self._server.stop(None).wait(WAIT_LIMIT)
