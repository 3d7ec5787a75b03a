"""``cipdplugin check`` on a machine set up for the CIPD client: options from the
environment and the config file, metadata from a real pRPC backend."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cipdplugin import InstanceMetadata, Pin, StaticRepository, instance_id_to_object_ref
from tests.conftest import REPO_ROOT, SHA256_ID, hex_id, plugin_cmd
from tests.hostile_http import HostileServer
from tests.proxy_servers import HttpProxy
from tests.prpc_backend import Fault, PrpcBackend, TLSFiles
from tests.test_cli import report, run_cli, verdicts
from tests.token_servers import LocalAuthServer, MetadataServer

ALLOWED = Pin("ok/tool", hex_id(1))
UNLISTED = Pin("ok/tool", hex_id(2))
MakeBackend = Callable[..., PrpcBackend]


@pytest.fixture
def backend(make_backend: MakeBackend) -> PrpcBackend:
    return make_backend(StaticRepository({ALLOWED: [InstanceMetadata(key="allow", value=b"yes")]}))


def metadata_plugin_env(**extra: str) -> dict[str, str]:
    return {"CIPD_ADMISSION_PLUGIN": json.dumps(plugin_cmd("metadata")), **extra}


def test_metadata_from_the_backend_in_cipd_service_url(backend: PrpcBackend) -> None:
    result = run_cli(
        "check", str(ALLOWED), str(UNLISTED), env=metadata_plugin_env(CIPD_SERVICE_URL=backend.url)
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"admitted  {ALLOWED}",
        f"denied    {UNLISTED}: no 'allow' metadata",
    ]
    assert len(backend.received) == 2
    assert all("Authorization" not in received.headers for received in backend.received)


def test_metadata_through_the_cipd_proxy(make_backend: MakeBackend, tmp_path: Path) -> None:
    socket_path = tmp_path / "proxy.sock"
    proxy = make_backend(
        StaticRepository({ALLOWED: [InstanceMetadata(key="allow", value=b"")]}), unix_socket=socket_path
    )
    env = metadata_plugin_env(
        CIPD_SERVICE_URL="https://cipd.example.com", CIPD_PROXY_URL=f"unix://{socket_path}"
    )
    result = run_cli("check", "-v", str(ALLOWED), env=env)
    assert result.returncode == 0, result.stderr
    assert [received.headers["Host"] for received in proxy.received] == ["cipd.example.com"]
    assert "Authorization" not in proxy.received[0].headers
    assert f"metadata from the backend through the CIPD proxy unix://{socket_path}" in result.stderr


def test_https_backend_gets_a_luci_auth_token(
    make_backend: MakeBackend, tls_files: TLSFiles, tmp_path: Path
) -> None:
    backend = make_backend(
        StaticRepository({ALLOWED: [InstanceMetadata(key="allow", value=b"")]}),
        token="ya29.cli",
        tls=tls_files,
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    luci_auth = bin_dir / "luci-auth"
    luci_auth.write_text(
        f'#!{sys.executable}\nprint(\'{{"token": "ya29.cli", "expiry": 4000000000}}\')\n', encoding="utf-8"
    )
    luci_auth.chmod(0o755)
    env = metadata_plugin_env(
        CIPD_SERVICE_URL=backend.url,
        SSL_CERT_FILE=str(tls_files.ca),
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    result = run_cli("check", "--json", str(ALLOWED), env=env)
    assert result.returncode == 0, result.stderr
    assert backend.received[0].headers["Authorization"] == "Bearer ya29.cli"

    without = run_cli("check", "--json", "--no-auth", str(ALLOWED), env=env)
    assert verdicts(without) == [("error", "UNAUTHENTICATED")]
    assert report(without)["pins"][0]["message"] == "missing or wrong OAuth2 token"


def test_a_backend_error_is_the_pins_error(backend: PrpcBackend) -> None:
    backend.inject(Fault("code", 7, "the caller may not read metadata"))
    result = run_cli("check", "--json", str(ALLOWED), env=metadata_plugin_env(CIPD_SERVICE_URL=backend.url))
    assert verdicts(result) == [("error", "PERMISSION_DENIED")]
    assert report(result)["pins"][0]["message"] == "the caller may not read metadata"


def test_allowlist_example_plugin_against_the_backend(make_backend: MakeBackend) -> None:
    pin = Pin("infra/tool", SHA256_ID)
    digest = instance_id_to_object_ref(SHA256_ID).hex_digest
    backend = make_backend(
        StaticRepository({pin: [InstanceMetadata(key="allowed-sha256", value=digest.encode())]})
    )
    plugin = json.dumps([sys.executable, str(REPO_ROOT / "examples" / "allowlist_plugin.py")])
    result = run_cli("check", "--plugin", plugin, "--service-url", backend.url, str(pin))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"admitted  {pin}\n"


# -- Where the plugin and the URL come from -------------------------------------------


def test_plugin_from_the_config_file_and_verbose_origins(backend: PrpcBackend, tmp_path: Path) -> None:
    config = tmp_path / "cipd.cfg"
    command = plugin_cmd("metadata")
    args = " ".join(f"args: {json.dumps(arg)}" for arg in command[1:])
    config.write_text(
        f"plugins {{ admission {{ cmd: {json.dumps(command[0])} {args} }} }}\n", encoding="utf-8"
    )
    env = {"CIPD_CONFIG_FILE": str(config), "CIPD_SERVICE_URL": f"{backend.url}/"}
    result = run_cli("check", "-v", str(ALLOWED), env=env)
    assert result.returncode == 0, result.stderr
    assert f"plugin command from the CIPD config file {config}: {command}" in result.stderr
    assert f"service URL {backend.url} from $CIPD_SERVICE_URL" in result.stderr
    assert "metadata from the backend, without credentials (plain http)" in result.stderr


def test_options_override_the_environment(backend: PrpcBackend) -> None:
    env = {"CIPD_ADMISSION_PLUGIN": '["/nonexistent/plugin"]', "CIPD_SERVICE_URL": "http://127.0.0.1:9"}
    plugin = json.dumps(plugin_cmd("metadata"))
    result = run_cli("check", "-v", "--plugin", plugin, "--service-url", backend.url, str(ALLOWED), env=env)
    assert result.returncode == 0, result.stderr
    assert "plugin command from --plugin" in result.stderr
    assert f"service URL {backend.url} from --service-url" in result.stderr


def test_default_service_url_is_named(tmp_path: Path) -> None:
    result = run_cli(
        "check",
        "-v",
        "--metadata",
        str(REPO_ROOT / "examples" / "metadata.json"),
        str(ALLOWED),
        env={"CIPD_ADMISSION_PLUGIN": json.dumps(plugin_cmd("admit"))},
    )
    assert result.returncode == 0, result.stderr
    assert "plugin command from $CIPD_ADMISSION_PLUGIN" in result.stderr
    assert "service URL https://chrome-infra-packages.appspot.com from the default" in result.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CIPD_SERVICE_URL": "https://cipd.example.com/path"}, "CIPD_SERVICE_URL"),
        ({"CIPD_PROXY_URL": "http://127.0.0.1:1"}, "CIPD_PROXY_URL"),
        ({"CIPD_CONFIG_FILE": "relative.cfg"}, "CIPD_CONFIG_FILE"),
        ({"CIPD_ADMISSION_PLUGIN": '{"cmd": 1}'}, "CIPD_ADMISSION_PLUGIN"),
    ],
)
def test_config_errors_exit_2_without_a_traceback(env: dict[str, str], expected: str) -> None:
    result = run_cli("check", str(ALLOWED), env=env)
    assert result.returncode == 2
    assert expected in result.stderr and "cipdplugin check: error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_an_unparsable_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "cipd.cfg"
    config.write_text("plugins {\n  admission { cmd: 42 }\n}\n", encoding="utf-8")
    result = run_cli("check", str(ALLOWED), env={"CIPD_CONFIG_FILE": str(config)})
    assert result.returncode == 2
    assert f"cannot parse CIPD config file {config}:2:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_file_without_a_plugin_is_no_plugin(tmp_path: Path) -> None:
    config = tmp_path / "cipd.cfg"
    config.write_text("plugins { admission { } }\n", encoding="utf-8")
    result = run_cli("check", str(ALLOWED), env={"CIPD_CONFIG_FILE": str(config)})
    assert result.returncode == 2
    assert "no plugin given" in result.stderr and f"{config} has none" in result.stderr


def test_deploy_from_env_example(make_backend: MakeBackend) -> None:
    pin = Pin("infra/tool", SHA256_ID)
    other = Pin("infra/tool", "B" + SHA256_ID[1:])
    digest = instance_id_to_object_ref(SHA256_ID).hex_digest
    backend = make_backend(
        StaticRepository({pin: [InstanceMetadata(key="allowed-sha256", value=digest.encode())]})
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("CIPD_")}
    env.update(
        CIPD_ADMISSION_PLUGIN=json.dumps(
            [sys.executable, str(REPO_ROOT / "examples" / "allowlist_plugin.py")]
        ),
        CIPD_SERVICE_URL=backend.url,
        CIPD_CONFIG_FILE="-",
    )
    script = REPO_ROOT / "examples" / "deploy_from_env.py"
    result = subprocess.run(
        [sys.executable, str(script), str(pin), str(other)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert f"  deployed  {pin}" in result.stdout.splitlines()
    assert f"  denied    {other}: no allowed-sha256 entry matches" in result.stdout

    broken = subprocess.run(
        [sys.executable, str(script), str(pin)],
        capture_output=True,
        text=True,
        env={**env, "CIPD_SERVICE_URL": "ftp://x"},
        timeout=60,
        check=False,
    )
    assert broken.returncode == 2
    assert "CIPD_SERVICE_URL" in broken.stderr and "Traceback" not in broken.stderr


# -- Deadlines, credentials and proxies ----------------------------------------------------


def test_backend_timeout_bounds_each_call_and_v_says_so() -> None:
    def silent(connection: socket.socket, number: int, stopping: threading.Event) -> bool:
        stopping.wait(60)
        return False

    with HostileServer(silent) as server:
        env = metadata_plugin_env(CIPD_SERVICE_URL=server.url)
        start = time.monotonic()
        result = run_cli("check", "-v", "--json", "--backend-timeout", "1.5", str(ALLOWED), env=env)
        elapsed = time.monotonic() - start
    assert verdicts(result) == [("error", "DEADLINE_EXCEEDED")]
    assert report(result)["pins"][0]["message"] == f"no answer from {server.url} within 1.5 s"
    assert f"backend calls go to {server.url}, each within 1.5 s" in result.stderr
    assert f"cipd.Repository/ListMetadata: waiting on {server.url} (up to 1.5 s)" in result.stderr
    assert f"cipd.Repository/ListMetadata to {server.url} failed (DEADLINE_EXCEEDED" in result.stderr
    assert elapsed < 30  # never the SDK's own 30 s call limit


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_backend_timeout_is_a_usage_error(value: str) -> None:
    result = run_cli("check", "--backend-timeout", value, str(ALLOWED), env=metadata_plugin_env())
    assert result.returncode == 2 and "--backend-timeout" in result.stderr


def test_bot_credentials_through_an_https_proxy(
    make_backend: MakeBackend, tls_files: TLSFiles, tmp_path: Path
) -> None:
    backend = make_backend(
        StaticRepository({ALLOWED: [InstanceMetadata(key="allow", value=b"")]}),
        token="task-token",
        tls=tls_files,
    )
    port = int(backend.url.rpartition(":")[2])
    with (
        LocalAuthServer({"task": "task-token"}) as local_auth,
        HttpProxy({f"backend.test:{port}": ("127.0.0.1", port)}, credentials=("bot", "s3cret")) as proxy,
    ):
        env = metadata_plugin_env(
            CIPD_SERVICE_URL=f"https://backend.test:{port}",
            HTTPS_PROXY=f"http://bot:s3cret@127.0.0.1:{proxy.port}",
            NO_PROXY="",
            LUCI_CONTEXT=str(local_auth.write_context(tmp_path / "luci_context.json", "task")),
            SSL_CERT_FILE=str(tls_files.ca),
        )
        result = run_cli("check", "-v", str(ALLOWED), str(UNLISTED), env=env)
        seen = proxy.seen
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"admitted  {ALLOWED}",
        f"denied    {UNLISTED}: no 'allow' metadata",
    ]
    assert "with credentials from LUCI_CONTEXT's local auth server (account 'task')" in result.stderr
    assert f"(through the proxy http://127.0.0.1:{proxy.port})" in result.stderr
    assert "s3cret" not in result.stderr and "task-token" not in result.stderr
    assert {(s.method, s.target) for s in seen} == {("CONNECT", f"backend.test:{port}")}
    assert all("authorization" not in s.headers for s in seen)
    assert {r.headers["Authorization"] for r in backend.received} == {"Bearer task-token"}
    assert len(local_auth.received) == 1


def test_service_account_json_gce(make_backend: MakeBackend, tls_files: TLSFiles) -> None:
    backend = make_backend(
        StaticRepository({ALLOWED: [InstanceMetadata(key="allow", value=b"")]}),
        token="gce-token",
        tls=tls_files,
    )
    with MetadataServer({"default": "gce-token"}) as metadata:
        env = metadata_plugin_env(
            CIPD_SERVICE_URL=backend.url, GCE_METADATA_HOST=metadata.host, SSL_CERT_FILE=str(tls_files.ca)
        )
        result = run_cli("check", "-v", "--service-account-json", ":gce", str(ALLOWED), env=env)
    assert result.returncode == 0, result.stderr
    assert f"with credentials from the GCE metadata server at {metadata.host}" in result.stderr
    assert backend.received[0].headers["Authorization"] == "Bearer gce-token"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--no-auth", "--service-account-json", ":gce"], "contradict"),
        (["--service-account-json", "/nonexistent/key.json"], "/nonexistent/key.json"),
    ],
)
def test_credential_options_errors_exit_2(args: list[str], expected: str) -> None:
    env = metadata_plugin_env(CIPD_SERVICE_URL="https://cipd.example.com")
    result = run_cli("check", *args, str(ALLOWED), env=env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
