"""The host: plugin processes, the loopback server, tickets, logs, metadata, shutdown."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf.empty_pb2 import Empty

from cipdplugin import Config, Host, PluginProcess, PluginStartError, StaticRepository
from cipdplugin.host.server import new_ticket
from cipdplugin.protocol import HOST_LOG, plugin_pb2
from tests.conftest import (
    REPO_ROOT,
    SERVICE_URL,
    ResourceSnapshot,
    assert_no_leaks,
    plugin_cmd,
    wait_until,
    zombies,
)

GENERIC_PLUGIN = REPO_ROOT / "tests" / "plugins" / "generic_plugin.py"
#: Plugins are named by the basename of their executable: here, the interpreter.
PLUGIN_NAME = Path(sys.executable).name


def generic_cmd(mode: str, *args: str) -> list[str]:
    return [sys.executable, str(GENERIC_PLUGIN), mode, *args]


class RecordingController:
    """A plugin kind that only records when its process exits."""

    def __init__(self) -> None:
        self.exited = threading.Event()
        self.returncode: int | None = None

    def plugin_exited(self, process: PluginProcess) -> None:
        self.returncode = process.returncode
        self.exited.set()


class Records(logging.Handler):
    """Collects the host logger's records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in list(self.records)]

    def wait_for(self, text: str, timeout: float = 10.0) -> bool:
        return wait_until(lambda: any(text in m for _, m in self.messages()), timeout)


@pytest.fixture
def records() -> Records:
    return Records()


def logged_host(make_host: Callable[..., Host], records: Records, config: Config | None = None) -> Host:
    logger = logging.getLogger(f"test-host-{id(records)}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(records)
    return make_host(config, logger=logger)


def test_wrong_command_line_fails_clearly(make_host: Callable[..., Host]) -> None:
    host = make_host()
    with pytest.raises(PluginStartError, match="no-such-plugin-binary"):
        host.launch_plugin(["/nonexistent/no-such-plugin-binary"], RecordingController())
    for bad in ([], [""], "python", [1, 2], None):
        with pytest.raises(ValueError, match="command line"):
            host.launch_plugin(bad, RecordingController())  # type: ignore[arg-type]


def test_not_executable_plugin_fails_clearly(make_host: Callable[..., Host], tmp_path: Path) -> None:
    script = tmp_path / "plugin.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(PluginStartError, match="Permission denied"):
        make_host().launch_plugin([str(script)], RecordingController())


def test_plugin_exits_when_host_closes(make_host: Callable[..., Host], records: Records) -> None:
    host = logged_host(make_host, records)
    controller = RecordingController()
    process = host.launch_plugin(generic_cmd("wait"), controller)
    assert records.wait_for("started")
    started = time.monotonic()
    host.close()
    assert time.monotonic() - started < 1.0, "a cooperative plugin should stop on stdin EOF"
    assert process.returncode == 0
    assert controller.exited.is_set()


def test_terminate_works(make_host: Callable[..., Host], records: Records) -> None:
    host = logged_host(make_host, records)
    process = host.launch_plugin(generic_cmd("wait"), RecordingController())
    assert records.wait_for("started")
    assert process.terminate() == 0
    assert process.done.is_set()
    assert process.wait(0) == 0
    assert process.terminate() == 0  # idempotent


def test_terminate_respects_a_short_timeout(make_host: Callable[..., Host]) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("ignore-sigterm"))
    assert plugin.check_admission(f"a/b:{'1' * 40}").exception(timeout=30) is None
    process = plugin._process
    assert process is not None
    started = time.monotonic()
    assert process.terminate(timeout=1.0) == -signal.SIGKILL
    assert time.monotonic() - started < 1.0 + 1.5


def test_ignoring_eof_but_honouring_sigterm_ends_by_sigterm(make_host: Callable[..., Host]) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("ignore-eof"))
    assert plugin.check_admission(f"a/b:{'1' * 40}").exception(timeout=30) is None
    process = plugin._process
    assert process is not None
    started = time.monotonic()
    host.close()
    assert process.returncode == -signal.SIGTERM
    assert time.monotonic() - started < 3.0


def test_ignoring_both_is_killed_with_its_children_by_the_deadline(make_host: Callable[..., Host]) -> None:
    host = make_host()
    plugin = host.new_admission_plugin(plugin_cmd("ignore-sigterm", "2"))
    assert plugin.check_admission(f"a/b:{'1' * 40}").exception(timeout=30) is None
    process = plugin._process
    assert process is not None
    # Two children, each with a grandchild.
    assert wait_until(lambda: len(psutil.Process(process.pid).children(recursive=True)) == 4)
    family = psutil.Process(process.pid).children(recursive=True)
    started = time.monotonic()
    host.close(timeout=2.0)
    assert time.monotonic() - started < 2.0 + 2.0
    assert process.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(family, timeout=2.0)
    assert not alive, f"descendants survived: {alive}"


def test_crash_on_start_reports_exit_code(make_host: Callable[..., Host]) -> None:
    controller = RecordingController()
    process = make_host().launch_plugin(plugin_cmd("crash-on-start"), controller)
    assert controller.exited.wait(10)
    assert process.returncode == 3
    assert "exited with code 3" in process.describe()
    assert "crashing on start as asked" in process.describe()


def test_crash_after_first_rpc(make_host: Callable[..., Host], records: Records) -> None:
    host = logged_host(make_host, records)
    controller = RecordingController()
    host.launch_plugin(generic_cmd("crash-after-rpc"), controller)
    assert records.wait_for("one rpc done")
    assert controller.exited.wait(10)
    assert controller.returncode == 5
    # The host still serves others.
    host.launch_plugin(generic_cmd("wait"), RecordingController())
    assert wait_until(lambda: sum("started" in m for _, m in records.messages()) == 1, 10)


def test_plugin_logs_reach_the_host_with_their_levels(
    make_host: Callable[..., Host], records: Records
) -> None:
    host = logged_host(make_host, records)
    host.launch_plugin(generic_cmd("log"), RecordingController())
    assert records.wait_for("error record")
    messages = records.messages()
    for level, text in [
        (logging.DEBUG, "debug record"),
        (logging.INFO, "info record"),
        (logging.WARNING, "warning record"),
        (logging.ERROR, "error record"),
    ]:
        assert (level, f"Plugin '{PLUGIN_NAME}': {text}") in messages


def test_plugin_output_is_forwarded_line_by_line(make_host: Callable[..., Host], records: Records) -> None:
    host = logged_host(make_host, records)
    host.launch_plugin(generic_cmd("print"), RecordingController())
    assert records.wait_for("hello on stderr")
    assert records.wait_for("hello on stdout")
    messages = records.messages()
    assert (logging.INFO, f"Plugin '{PLUGIN_NAME}' stdout: hello on stdout") in messages
    assert (logging.WARNING, f"Plugin '{PLUGIN_NAME}' stderr: hello on stderr") in messages


def test_several_plugins_run_concurrently_and_all_stop_on_close(
    make_host: Callable[..., Host], records: Records
) -> None:
    host = logged_host(make_host, records)
    controllers = [RecordingController() for _ in range(8)]
    launched: list[PluginProcess] = []
    threads = [
        threading.Thread(target=lambda c=c: launched.append(host.launch_plugin(generic_cmd("wait"), c)))
        for c in controllers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(launched) == 8
    assert wait_until(lambda: sum("started" in m for _, m in records.messages()) == 8, 20)
    host.close()
    assert all(c.exited.is_set() for c in controllers)
    assert all(p.returncode == 0 for p in launched)
    assert len({p.pid for p in launched}) == 8


def test_server_start_failure_fails_every_launch(make_host: Callable[..., Host]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host = make_host(port=taken.getsockname()[1])
        before = {p.pid for p in psutil.Process().children()}
        for _ in range(2):
            with pytest.raises(PluginStartError, match="cannot start the plugin server"):
                host.launch_plugin(generic_cmd("wait"), RecordingController())
        plugin = host.new_admission_plugin(plugin_cmd("admit"))
        error = plugin.check_admission(f"a/b:{'1' * 40}").exception(timeout=10)
        assert isinstance(error, PluginStartError)
        assert "cannot start the plugin server" in error.message
    # The processes launched meanwhile were terminated.
    assert wait_until(lambda: not ({p.pid for p in psutil.Process().children()} - before))


def _call_log(port: int, metadata: tuple[tuple[str, str], ...] | None) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
        call = channel.unary_unary(
            HOST_LOG,
            request_serializer=plugin_pb2.LogRequest.SerializeToString,
            response_deserializer=Empty.FromString,
        )
        try:
            call(plugin_pb2.LogRequest(severity="info", message="intruder"), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def test_missing_and_wrong_tickets_are_rejected(make_host: Callable[..., Host], records: Records) -> None:
    host = logged_host(make_host, records)
    host.launch_plugin(generic_cmd("wait"), RecordingController())
    assert records.wait_for("started")
    assert _call_log(host.port, None) is grpc.StatusCode.UNAUTHENTICATED
    assert _call_log(host.port, (("x-plugin-ticket", "wrong"),)) is grpc.StatusCode.PERMISSION_DENIED
    assert _call_log(host.port, (("x-plugin-ticket", new_ticket()),)) is grpc.StatusCode.PERMISSION_DENIED
    assert not records.wait_for("intruder", timeout=0.2)


def test_tickets_are_64_random_bytes_unpadded_base64() -> None:
    tickets = {new_ticket() for _ in range(100)}
    assert len(tickets) == 100
    for ticket in tickets:
        assert len(ticket) == 86  # ceil(64 * 4 / 3), no padding
        assert "=" not in ticket


class FailingRepository:
    def list_metadata(self, request: object) -> object:
        from cipdplugin import AdmissionError

        raise AdmissionError(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota is gone")


@pytest.mark.parametrize(
    ("config", "url", "outcome"),
    [
        (None, SERVICE_URL, "outcome: INTERNAL"),
        (Config(SERVICE_URL), SERVICE_URL, "outcome: UNIMPLEMENTED"),
        (
            Config(SERVICE_URL, StaticRepository()),
            "https://elsewhere.example.com",
            "outcome: PERMISSION_DENIED",
        ),
        (Config(SERVICE_URL, StaticRepository()), SERVICE_URL, "outcome: OK 0 entries"),
        (Config(SERVICE_URL, FailingRepository()), SERVICE_URL, "outcome: RESOURCE_EXHAUSTED quota is gone"),  # type: ignore[arg-type]
    ],
    ids=["no-config", "no-repository", "other-url", "forwarded", "repository-error"],
)
def test_list_metadata_cases(
    make_host: Callable[..., Host], records: Records, config: Config | None, url: str, outcome: str
) -> None:
    logger = logging.getLogger(f"test-metadata-{id(records)}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(records)
    host = Host(config, logger=logger)
    try:
        host.launch_plugin(generic_cmd("list-metadata", url), RecordingController())
        assert records.wait_for(outcome), records.messages()
    finally:
        host.close()


def test_initialize_only_before_launch() -> None:
    host = Host()
    assert host.config is None
    host.initialize(Config(SERVICE_URL))
    assert host.service_url == SERVICE_URL
    host.launch_plugin(generic_cmd("wait"), RecordingController())
    with pytest.raises(RuntimeError, match="before any plugin"):
        host.initialize(Config(SERVICE_URL))
    host.close()
    with pytest.raises(RuntimeError, match="closed"):
        host.initialize(Config(SERVICE_URL))
    with pytest.raises(PluginStartError, match="closed"):
        host.launch_plugin(generic_cmd("wait"), RecordingController())
    with pytest.raises(RuntimeError, match="closed"):
        host.new_admission_plugin(plugin_cmd("admit"))


def test_close_is_idempotent_and_bounded(make_host: Callable[..., Host]) -> None:
    host = make_host()
    host.launch_plugin(generic_cmd("wait"), RecordingController())
    host.close()
    started = time.monotonic()
    host.close()
    host.close(timeout=0.1)
    assert time.monotonic() - started < 0.5


def test_nothing_is_left_after_close(make_host: Callable[..., Host], records: Records) -> None:
    # Warm up: grpc sets up process-wide resources on first use.
    warm = logged_host(make_host, records)
    warm.launch_plugin(generic_cmd("wait"), RecordingController())
    warm.new_admission_plugin(plugin_cmd("admit")).check_admission(f"a/b:{'1' * 40}").result(timeout=30)
    warm.close()
    time.sleep(0.2)
    before = ResourceSnapshot()

    host = Host(Config(SERVICE_URL, StaticRepository()))
    for _ in range(3):
        host.launch_plugin(generic_cmd("wait"), RecordingController())
    plugin = host.new_admission_plugin(plugin_cmd("admit"))
    for n in range(50):
        plugin.check_admission(f"a/b:{n:040x}")
    plugin.check_admission(f"a/b:{0:040x}").result(timeout=30)
    host.close()
    assert_no_leaks(before)
    assert not zombies()


def test_interpreter_exit_terminates_plugins_of_unclosed_hosts(tmp_path: Path) -> None:
    script = tmp_path / "forgetful.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from cipdplugin import Config, Host\n"
        "host = Host(Config('https://x.example.com'))\n"
        f"plugin = host.new_admission_plugin({plugin_cmd('ignore-eof')!r})\n"
        "plugin.check_admission('a/b:' + '1' * 40).result(timeout=30)\n"
        "print(plugin._process.pid, flush=True)\n"
        "# no close(): the exit hook must stop the plugin\n"
    )
    done = __import__("subprocess").run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    assert wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 5)
