"""``PrpcRepository`` against hostile and broken servers: exact answers, one deadline, nothing left behind."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cipdplugin import (
    AdmissionError,
    Config,
    Host,
    InstanceMetadata,
    ListMetadataRequest,
    Pin,
    PrpcRepository,
    StaticRepository,
    instance_id_to_object_ref,
)
from tests.conftest import ResourceSnapshot, assert_no_leaks, hex_id, hostile_cmd, plugin_cmd, read_result
from tests.hostile_http import HostileServer, Script, answer_bytes, drip, forever, gzip_bomb, head
from tests.prpc_backend import PrpcBackend

#: The call limit of these tests, in seconds.
TIMEOUT = 2.0
#: What a call may take beyond its limit: the thread's wake-up on a loaded
#: machine, never a server's doing.
SLACK = 1.5
BODY = answer_bytes(3)
MakeServer = Callable[[Script], HostileServer]


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    servers: list[HostileServer] = []

    def make(script: Script) -> HostileServer:
        server = HostileServer(script)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def repository(url: str, timeout: float = TIMEOUT) -> PrpcRepository:
    return PrpcRepository(url, timeout=timeout, initial_backoff=0.02, max_backoff=0.1, environ={})


def timed_call(repo: PrpcRepository) -> tuple[float, AdmissionError]:
    start = time.monotonic()
    with pytest.raises(AdmissionError) as caught:
        repo.list_metadata(ListMetadataRequest(package="some/pkg"))
    return time.monotonic() - start, caught.value


# -- Exact bodies ------------------------------------------------------------------------


def test_a_truncated_answer_is_never_accepted(make_server: MakeServer) -> None:
    def truncated(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        connection.sendall(head(len(BODY)) + BODY[: len(BODY) * 2 // 3])  # 2 of 3 entries, then close
        return False

    server = make_server(truncated)
    with repository(server.url, timeout=1.0) as repo:
        _, error = timed_call(repo)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert f"shorter than announced: {len(BODY) * 2 // 3} of {len(BODY)} bytes" in error.message
    assert server.requests > 1  # retried like a dropped connection


def test_a_truncated_answer_is_retried_and_the_whole_answer_returned(make_server: MakeServer) -> None:
    def once_truncated(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        connection.sendall(head(len(BODY)) + (BODY[:40] if number == 0 else BODY))
        return number > 0

    server = make_server(once_truncated)
    with repository(server.url) as repo:
        answer = repo.list_metadata(ListMetadataRequest(package="some/pkg"))
    assert [md.key for md in answer.metadata] == ["key0", "key1", "key2"]
    assert server.requests == 2


def test_a_chunked_answer_cut_short_is_an_error(make_server: MakeServer) -> None:
    def cut(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        connection.sendall(
            head(None, "Transfer-Encoding: chunked") + f"{len(BODY):x}\r\n".encode() + BODY[:50]
        )
        return False

    with repository(make_server(cut).url, timeout=0.5) as repo:
        _, error = timed_call(repo)
    assert error.code == grpc.StatusCode.UNAVAILABLE and "shorter than announced" in error.message


def test_an_over_long_answer_is_an_error(make_server: MakeServer) -> None:
    forged = head(len(BODY)) + BODY

    def over_long(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        connection.sendall(head(len(BODY)) + BODY + forged)  # a second answer nobody asked for
        return True

    server = make_server(over_long)
    with repository(server.url, timeout=0.5) as repo:
        _, error = timed_call(repo)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "longer than announced" in error.message


def test_bytes_arriving_after_an_answer_are_never_read_as_the_next_one(make_server: MakeServer) -> None:
    forged = answer_bytes(1).replace(b"key0", b"fake")

    def late_extra(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        connection.sendall(head(len(BODY)) + BODY)
        stopping.wait(0.2)
        connection.sendall(head(len(forged)) + forged)  # on an idle keep-alive connection
        return True

    server = make_server(late_extra)
    with repository(server.url) as repo:
        first = repo.list_metadata(ListMetadataRequest(package="some/pkg"))
        time.sleep(0.5)
        second = repo.list_metadata(ListMetadataRequest(package="some/pkg"))
    assert [md.key for md in first.metadata] == [md.key for md in second.metadata] == ["key0", "key1", "key2"]


# -- One deadline per call -------------------------------------------------------------


def _dripped_body(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
    connection.sendall(head(len(BODY)))
    drip(connection, BODY, 0.05, stopping)
    return False


def _endless_continue(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
    forever(connection, b"HTTP/1.1 100 Continue\r\n\r\n", 0.4, stopping)
    return False


def _endless_trailers(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
    connection.sendall(
        head(None, "Transfer-Encoding: chunked") + f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n"
    )
    forever(connection, b"X-More: 1\r\n", 0.05, stopping)
    return False


def _dripped_header_line(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
    connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    forever(connection, b"a", 0.05, stopping)
    return False


def _silent(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
    stopping.wait(60)
    return False


@pytest.mark.parametrize(
    "script",
    [_dripped_body, _endless_continue, _endless_trailers, _dripped_header_line, _silent],
    ids=["dripped-body", "endless-100-continue", "endless-trailers", "dripped-header-line", "silent"],
)
def test_the_timeout_bounds_the_whole_answer(make_server: MakeServer, script: Script) -> None:
    server = make_server(script)
    with repository(server.url) as repo:
        elapsed, error = timed_call(repo)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.message == f"no answer from {server.url} within 2 s"
    assert TIMEOUT - 0.1 <= elapsed < TIMEOUT + SLACK


def test_fast_informational_answers_are_counted(make_server: MakeServer) -> None:
    def many_continues(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 6 + head(len(BODY)) + BODY)
        return False

    with repository(make_server(many_continues).url, timeout=0.5) as repo:
        elapsed, error = timed_call(repo)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "more than 5 informational (1xx) answers" in error.message
    assert elapsed < 0.5 + SLACK


def test_the_per_call_timeout_shortens_the_repositorys(make_server: MakeServer) -> None:
    server = make_server(_silent)
    with repository(server.url, timeout=30) as repo:
        start = time.monotonic()
        with pytest.raises(AdmissionError) as caught:
            repo.list_metadata(ListMetadataRequest(package="some/pkg"), timeout=1.0)
        elapsed = time.monotonic() - start
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert caught.value.message == f"no answer from {server.url} within 1 s"
        assert 0.9 <= elapsed < 1.0 + SLACK
        # Never longer than the repository's own limit.
        repo.timeout = 0.5
        start = time.monotonic()
        with pytest.raises(AdmissionError, match=r"within 0\.5 s"):
            repo.list_metadata(ListMetadataRequest(package="some/pkg"), timeout=20)
        assert time.monotonic() - start < 0.5 + SLACK


def test_closing_ends_a_call_blocked_on_the_backend(make_server: MakeServer) -> None:
    repo = repository(make_server(_dripped_body).url, timeout=30)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(repo.list_metadata, ListMetadataRequest(package="some/pkg"))
        time.sleep(0.3)
        start = time.monotonic()
        repo.close()
        error = call.exception(timeout=10)
        elapsed = time.monotonic() - start
    assert isinstance(error, AdmissionError) and error.code == grpc.StatusCode.CANCELLED
    assert elapsed < SLACK


# -- Decompression -----------------------------------------------------------------------


def test_a_gzip_answer_is_decompressed(make_server: MakeServer) -> None:
    import gzip

    packed = gzip.compress(BODY)

    def gzipped(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        connection.sendall(head(len(packed), "Content-Encoding: gzip") + packed)
        return True

    with repository(make_server(gzipped).url) as repo:
        answer = repo.list_metadata(ListMetadataRequest(package="some/pkg"))
    assert len(answer.metadata) == 3


def test_a_gzip_bomb_is_refused_while_decompressing(make_server: MakeServer) -> None:
    bomb = gzip_bomb(256 * 1024 * 1024)  # about 255 KiB on the wire

    def bombing(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        connection.sendall(head(len(bomb), "Content-Encoding: gzip") + bomb)
        return True

    server = make_server(bombing)
    with repository(server.url) as repo:
        elapsed, error = timed_call(repo)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "more than 33554432 bytes once decompressed" in error.message
    assert server.requests == 1  # not retried: the same answer would come back
    assert elapsed < TIMEOUT
    # In a process of its own, the bomb costs the 32 MiB limit in memory, not its 256 MiB.
    script = (
        "import resource, sys\n"
        "from cipdplugin import PrpcRepository, ListMetadataRequest, AdmissionError\n"
        "repo = PrpcRepository(sys.argv[1], timeout=20, environ={})\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    repo.list_metadata(ListMetadataRequest(package='p'))\n"
        "except AdmissionError as exc:\n    print(exc.code.name)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, server.url], capture_output=True, text=True, timeout=60, check=True
    )
    code, grown_kib = done.stdout.split()
    assert code == "UNAVAILABLE"
    assert int(grown_kib) < 48 * 1024, f"a 256 MiB bomb took {int(grown_kib) // 1024} MiB"


# -- fork() ---------------------------------------------------------------------------


def test_a_forked_child_never_reads_the_parents_answers(make_backend: Callable[..., PrpcBackend]) -> None:
    pins = {name: Pin(name, hex_id(7)) for name in ("warm/up", "parent/pkg", "child/pkg")}
    backend = make_backend(
        StaticRepository({pin: [InstanceMetadata(key=name)] for name, pin in pins.items()})
    )
    ref = instance_id_to_object_ref(hex_id(7)).SerializeToString().hex()
    script = f"""
import json, os
from cipdplugin import ListMetadataRequest, ObjectRef, PrpcRepository
ref = ObjectRef.FromString(bytes.fromhex({ref!r}))
repo = PrpcRepository({backend.url!r}, timeout=20, environ={{}})
repo.list_metadata(ListMetadataRequest(package="warm/up", instance=ref))
pid = os.fork()
mine = "child/pkg" if pid == 0 else "parent/pkg"
wrong = 0
for _ in range(200):
    answer = repo.list_metadata(ListMetadataRequest(package=mine, instance=ref))
    wrong += [md.key for md in answer.metadata] != [mine]
if pid == 0:
    os._exit(min(wrong, 100))
_, status = os.waitpid(pid, 0)
print(json.dumps({{"parent": wrong, "child": os.waitstatus_to_exitcode(status)}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"parent": 0, "child": 0}
    assert len(backend.received) == 401


# -- Through a host ------------------------------------------------------------------------


def test_a_hung_backend_leaves_nothing_behind_a_host(
    make_server: MakeServer, baseline: ResourceSnapshot
) -> None:
    server = make_server(_silent)
    repo = repository(server.url)
    with Host(Config(repo.service_url, repo)) as host:
        plugin = host.new_admission_plugin(plugin_cmd("metadata"))
        start = time.monotonic()
        error = plugin.check_admission(Pin("ok/tool", hex_id(1))).exception(timeout=60)
        elapsed = time.monotonic() - start
    repo.close()
    server.close()  # its own threads and sockets; the client's are the client's to close
    assert isinstance(error, AdmissionError)
    assert (error.code, error.message) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"no answer from {server.url} within 2 s",
    )
    assert elapsed < 20  # the plugin's start, then the backend's 2 s; never the SDK's 30 s limit
    assert_no_leaks(baseline)


def test_the_host_answers_before_the_plugins_own_call_gives_up(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """A repository with a longer timeout than the plugin's call is given the
    call's time less a margin: the plugin hears which backend did not answer,
    not a bare DEADLINE_EXCEEDED of its own."""
    server = make_server(_silent)
    repo = repository(server.url, timeout=30.0)
    report = tmp_path / "metadata.json"
    with Host(Config(repo.service_url, repo)) as host:
        host.launch_plugin(hostile_cmd("metadata-deadline", str(report), "3", repo.service_url), object())
        result = read_result(report)
    repo.close()
    server.close()
    assert result["code"] == "DEADLINE_EXCEEDED"
    assert result["details"] == f"no answer from {server.url} within 2 s"  # 3 s, less METADATA_ANSWER_MARGIN
    assert result["seconds"] < 3.0
