"""Access tokens: the shared cache, secrets kept out of messages, and every source against a local server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from cipdplugin import (
    AdmissionError,
    Config,
    ConfigError,
    GceTokenSource,
    GoogleAuthTokenSource,
    Host,
    InstanceMetadata,
    ListMetadataRequest,
    LuciAuthTokenSource,
    LuciContextTokenSource,
    Pin,
    PrpcRepository,
    StaticRepository,
    default_token_source,
    instance_id_to_object_ref,
)
from cipdplugin.backend import EMAIL_SCOPE, BoundedTokenSource, TokenSource
from cipdplugin.deadline import Deadline
from tests.conftest import Records, hex_id, plugin_cmd
from tests.proxy_servers import HttpProxy
from tests.prpc_backend import PrpcBackend, TLSFiles
from tests.token_servers import LocalAuthServer, MetadataServer, OAuthServer

PIN = Pin("ok/tool", hex_id(1))
#: A cut-off point for calls under load: what a call may take beyond its limit.
SLACK = 1.5
MakeBackend = Callable[..., PrpcBackend]


def request(pin: Pin = PIN) -> ListMetadataRequest:
    return ListMetadataRequest(package=pin.package, instance=instance_id_to_object_ref(pin.instance_id))


def failure(call: Callable[[], object]) -> AdmissionError:
    with pytest.raises(AdmissionError) as caught:
        call()
    return caught.value


@pytest.fixture
def trusted(tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch) -> TLSFiles:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    return tls_files


@pytest.fixture
def backend(make_backend: MakeBackend, trusted: TLSFiles) -> PrpcBackend:
    """An https backend that wants ``Bearer good-token``."""
    return make_backend(StaticRepository({PIN: [InstanceMetadata(key="k")]}), token="good-token", tls=trusted)


def repository(backend: PrpcBackend, source: TokenSource, timeout: float = 10) -> PrpcRepository:
    return PrpcRepository(backend.url, token_source=source, timeout=timeout, environ={})


class Counting:
    """A plain token source that counts its calls; it may sleep and fail."""

    def __init__(
        self, token: str = "good-token", *, delay: float = 0, error: str = "", expiry: float | None = None
    ):
        self.token, self.delay, self.error, self.expiry = token, delay, error, expiry
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> str | tuple[str, float]:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        if self.error:
            raise RuntimeError(self.error)
        return self.token if self.expiry is None else (self.token, self.expiry)


# -- One request for all, a remembered failure, each call's own deadline --------------------------


def test_concurrent_calls_share_one_failing_token_request(backend: PrpcBackend) -> None:
    source = Counting(delay=2, error="the login expired")
    with repository(backend, source, timeout=3) as repo, ThreadPoolExecutor(8) as pool:
        start = time.monotonic()
        calls = [pool.submit(failure, lambda: repo.list_metadata(request())) for _ in range(8)]
        errors = [call.result(timeout=30) for call in calls]
        slowest = time.monotonic() - start
        assert source.calls == 1
        assert slowest < 2 + SLACK
        assert {(e.code, e.message) for e in errors} == {
            (
                grpc.StatusCode.UNAUTHENTICATED,
                "cannot get an access token from the token source: RuntimeError: the login expired",
            )
        }
        # Remembered: the next call fails at once, without running the source.
        start = time.monotonic()
        assert failure(lambda: repo.list_metadata(request())).code == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - start < 0.5
        assert source.calls == 1
    assert backend.received == []


def test_a_remembered_failure_is_forgotten(backend: PrpcBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cipdplugin.backend.tokens.TOKEN_FAILURE_MEMORY", 0.3)
    source = Counting(error="down")
    with repository(backend, source) as repo:
        failure(lambda: repo.list_metadata(request()))
        time.sleep(0.5)
        source.error = ""
        assert len(repo.list_metadata(request()).metadata) == 1
    assert source.calls == 2


def test_no_call_waits_on_a_slow_source_beyond_its_own_deadline(backend: PrpcBackend) -> None:
    source = Counting(delay=4)
    with repository(backend, source, timeout=1) as repo, ThreadPoolExecutor(4) as pool:
        start = time.monotonic()
        errors = list(pool.map(lambda _: failure(lambda: repo.list_metadata(request())), range(4)))
        slowest = time.monotonic() - start
    assert slowest < 1 + SLACK
    assert {(e.code, e.message) for e in errors} == {
        (grpc.StatusCode.DEADLINE_EXCEEDED, "no access token from the token source within 1 s")
    }
    assert source.calls == 1


def fake_luci_auth(directory: Path, body: str) -> Path:
    """An executable ``luci-auth`` running ``body`` (Python, ``argv`` in scope)."""
    script = directory / "luci-auth"
    script.write_text(
        f"#!{sys.executable}\nimport sys, time\nargv = sys.argv[1:]\n{body}\n", encoding="utf-8"
    )
    script.chmod(0o755)
    return script


def test_a_token_command_is_killed_at_the_calls_deadline(backend: PrpcBackend, tmp_path: Path) -> None:
    script = fake_luci_auth(tmp_path, "time.sleep(60)")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with repository(backend, LuciAuthTokenSource(str(script)), timeout=1) as repo:
        start = time.monotonic()
        error = failure(lambda: repo.list_metadata(request()))
        elapsed = time.monotonic() - start
    assert (error.code, error.message) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "no access token from 'luci-auth token' (the luci-auth login) within 1 s",
    )
    assert elapsed < 1 + SLACK
    # Nothing the call started outlives it: the command is gone, reaped.
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= before


def test_a_token_command_printing_without_end_is_stopped(tmp_path: Path) -> None:
    script = fake_luci_auth(tmp_path, "while True:\n    sys.stdout.write('x' * 1_000_000)")
    start = time.monotonic()
    error = failure(LuciAuthTokenSource(str(script), timeout=20))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.message == "'luci-auth token' printed more than 65536 bytes"
    assert time.monotonic() - start < 10


def test_token_source_parameters_are_checked() -> None:
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            LuciAuthTokenSource(timeout=bad)
    with pytest.raises(ValueError, match="lifetime"):
        LuciAuthTokenSource(lifetime=3600)
    with pytest.raises(ValueError, match="max_output"):
        LuciAuthTokenSource(max_output=0)


# -- Refresh as luci refreshes ----------------------------------------------------------


def test_a_token_is_kept_until_shortly_before_it_expires(backend: PrpcBackend) -> None:
    # 10 s of minimum lifetime plus up to 30 s of jitter: 45 s left is always enough.
    lasting = Counting(expiry=time.time() + 45)
    with repository(backend, lasting) as repo:
        for _ in range(5):
            repo.list_metadata(request())
    assert lasting.calls == 1
    # Under 10 s left: fetched again for every call.
    expiring = Counting(expiry=time.time() + 5)
    with repository(backend, expiring) as repo:
        for _ in range(3):
            repo.list_metadata(request())
    assert expiring.calls == 3


def test_an_expired_token_is_refused(backend: PrpcBackend) -> None:
    with repository(backend, Counting(expiry=time.time() - 1)) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert (error.code, error.message) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "the token source returned a token that has already expired",
    )


def test_a_refused_token_is_fetched_again(backend: PrpcBackend) -> None:
    source = Counting("stale-token", expiry=time.time() + 3600)
    with repository(backend, source) as repo:
        assert failure(lambda: repo.list_metadata(request())).code == grpc.StatusCode.UNAUTHENTICATED
        source.token = "good-token"
        assert len(repo.list_metadata(request()).metadata) == 1
    assert source.calls == 2


# -- Secrets never leave the request ---------------------------------------------------------


CANARY = "CANARY7f3a"


@pytest.mark.parametrize(
    "token",
    [
        f"ya29.{CANARY}\r\nX-Injected: 1",
        f"ya29.{CANARY}\nsecond-line",
        f"ya29.{CANARY}\x00",
        f"ya29.{CANARY}é",
        f"ya29.{CANARY}\x7f",
    ],
    ids=["crlf", "two-lines", "nul", "non-ascii", "delete"],
)
def test_an_invalid_token_is_refused_without_showing_it(
    backend: PrpcBackend, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cipdplugin")
    with repository(backend, lambda: token) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "one line of printable ASCII" in error.message
    assert CANARY not in str(error) and CANARY not in repr(error)
    assert CANARY not in caplog.text
    assert backend.received == []


def test_a_token_with_a_trailing_newline_is_stripped(
    make_backend: MakeBackend, trusted: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cipdplugin")
    backend = make_backend(StaticRepository({PIN: []}), token=f"ya29.{CANARY}", tls=trusted)
    with repository(backend, lambda: (f"  ya29.{CANARY}\n", time.time() + 3600)) as repo:
        repo.list_metadata(request())
    assert backend.received[0].headers["Authorization"] == f"Bearer ya29.{CANARY}"
    assert CANARY not in caplog.text


def test_no_token_reaches_the_plugin_or_the_hosts_log(
    backend: PrpcBackend, records: Records, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cipdplugin")
    repo = repository(backend, lambda: f"ya29.{CANARY}\r\nX-Injected: 1")
    with repo, Host(Config(repo.service_url, repo), logger=records.logger) as host:
        plugin = host.new_admission_plugin(plugin_cmd("metadata"))
        error = plugin.check_admission(PIN).exception(timeout=60)
    assert isinstance(error, AdmissionError) and error.code == grpc.StatusCode.UNAUTHENTICATED
    assert CANARY not in error.message
    assert not [message for _, message in records.messages() if CANARY in message]
    assert CANARY not in caplog.text


# -- LUCI_CONTEXT ------------------------------------------------------------------------------


@pytest.fixture
def local_auth() -> Iterator[LocalAuthServer]:
    with LocalAuthServer({"task": "task-token", "system": "system-token"}) as server:
        yield server


def luci_context(server: LocalAuthServer, tmp_path: Path, default: str | None = "task") -> dict[str, str]:
    return {"LUCI_CONTEXT": str(server.write_context(tmp_path / "luci_context.json", default))}


def test_luci_context_asks_the_local_auth_server(local_auth: LocalAuthServer, tmp_path: Path) -> None:
    source = LuciContextTokenSource(luci_context(local_auth, tmp_path))
    token, expiry = source()
    assert token == "task-token" and expiry > time.time() + 3000
    (received,) = local_auth.received
    assert (received.method, received.path) == ("POST", "/rpc/LuciLocalAuthService.GetOAuthToken")
    assert received.headers["Content-Type"] == "application/json"
    body = json.loads(received.body)
    assert body == {"scopes": [EMAIL_SCOPE], "secret": local_auth.secret, "account_id": "task"}
    assert source.description == "LUCI_CONTEXT's local auth server (account 'task')"


def test_luci_context_sends_the_secret_as_go_does(tmp_path: Path) -> None:
    # protobuf's JSON accepts URL-safe, unpadded base64; luci's server wants the standard form.
    with LocalAuthServer({"task": "task-token"}, secret=b"\xfb\xff") as server:
        path = server.write_context(tmp_path / "luci_context.json", "task")
        context = json.loads(path.read_text(encoding="utf-8"))
        assert context["local_auth"]["secret"] == "+/8="
        context["local_auth"]["secret"] = "-_8"
        path.write_text(json.dumps(context), encoding="utf-8")
        assert LuciContextTokenSource({"LUCI_CONTEXT": str(path)})()[0] == "task-token"
        context["local_auth"]["secret"] = "not base64!"
        path.write_text(json.dumps(context), encoding="utf-8")
        with pytest.raises(ConfigError, match="not base64"):
            LuciContextTokenSource({"LUCI_CONTEXT": str(path)})


def test_luci_context_errors(local_auth: LocalAuthServer, tmp_path: Path) -> None:
    environ = luci_context(local_auth, tmp_path)
    local_auth.inject("error")
    error = failure(LuciContextTokenSource(environ))
    assert (error.code, error.message) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "local auth - RPC code 4: the account is disabled",
    )
    local_auth.secret = "another-secret"
    error = failure(LuciContextTokenSource(environ))
    assert error.message == "local auth - HTTP 403: Invalid secret."
    assert len(local_auth.received) == 2  # 403 is final


def test_luci_context_retries_http_500(local_auth: LocalAuthServer, tmp_path: Path) -> None:
    local_auth.inject("500", "500")
    assert LuciContextTokenSource(luci_context(local_auth, tmp_path))()[0] == "task-token"
    assert len(local_auth.received) == 3


def test_luci_context_unknown_account(local_auth: LocalAuthServer, tmp_path: Path) -> None:
    local_auth.tokens.pop("task")
    error = failure(LuciContextTokenSource(luci_context(local_auth, tmp_path)))
    assert error.message == "local auth - HTTP 404: Unrecognized account ID 'task'."


def test_luci_context_needs_a_default_account(local_auth: LocalAuthServer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="default_account_id"):
        LuciContextTokenSource(luci_context(local_auth, tmp_path, default=None))
    with pytest.raises(ConfigError, match="local_auth"):
        LuciContextTokenSource({})
    broken = tmp_path / "broken.json"
    broken.write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match="not JSON"):
        LuciContextTokenSource({"LUCI_CONTEXT": str(broken)})


def test_luci_context_never_goes_through_a_proxy(local_auth: LocalAuthServer, tmp_path: Path) -> None:
    with HttpProxy({}) as proxy:
        environ = {**luci_context(local_auth, tmp_path), "HTTP_PROXY": proxy.url, "NO_PROXY": ""}
        assert LuciContextTokenSource(environ)()[0] == "task-token"
        assert proxy.seen == []


def test_luci_context_tokens_reach_the_backend(
    local_auth: LocalAuthServer, backend: PrpcBackend, tmp_path: Path
) -> None:
    local_auth.tokens["task"] = "good-token"
    with repository(backend, LuciContextTokenSource(luci_context(local_auth, tmp_path))) as repo:
        for _ in range(3):
            repo.list_metadata(request())
    assert len(local_auth.received) == 1


# -- The GCE metadata server -------------------------------------------------------------------


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    with MetadataServer({"default": "gce-token", "bot@p.iam.gserviceaccount.com": "bot-token"}) as server:
        yield server


def test_gce_asks_the_metadata_server(metadata: MetadataServer) -> None:
    token, expiry = GceTokenSource(environ={"GCE_METADATA_HOST": metadata.host})()
    assert token == "gce-token" and abs(expiry - (time.time() + 3599)) < 60
    (received,) = metadata.received
    assert (received.method, received.path) == (
        "GET",
        "/computeMetadata/v1/instance/service-accounts/default/token",
    )
    assert received.headers["Metadata-Flavor"] == "Google"
    other = GceTokenSource("bot@p.iam.gserviceaccount.com", environ={"GCE_METADATA_HOST": metadata.host})
    assert other()[0] == "bot-token"


def test_gce_errors(metadata: MetadataServer) -> None:
    environ = {"GCE_METADATA_HOST": metadata.host}
    error = failure(GceTokenSource("nobody@p.iam.gserviceaccount.com", environ=environ))
    assert (
        error.message
        == "the GCE metadata server has no service account 'nobody@p.iam.gserviceaccount.com' (HTTP 404)"
    )
    metadata.inject("incomplete", "500")
    assert GceTokenSource(environ=environ)()[0] == "gce-token"  # both transient, retried
    with pytest.raises(ValueError, match="account"):
        GceTokenSource("../../evil")
    with pytest.raises(ConfigError, match="GCE_METADATA_HOST"):
        GceTokenSource(environ={"GCE_METADATA_HOST": "host/with/path"})


def test_gce_within_the_calls_deadline(metadata: MetadataServer) -> None:
    metadata.inject("slow")
    source = GceTokenSource(environ={"GCE_METADATA_HOST": metadata.host})
    start = time.monotonic()
    error = failure(lambda: source.fetch(Deadline(1)))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 1 + SLACK


def test_gce_defaults_to_the_documented_address() -> None:
    assert "169.254.169.254" in GceTokenSource(environ={}).description  # built, never called


# -- A service account key through google-auth ------------------------------------------------------


def service_account_key(directory: Path, token_uri: str) -> Path:
    pytest.importorskip("google.auth")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    pem = directory / "key.pem"
    subprocess.run(
        [openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pem)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    key = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "0123",
        "private_key": pem.read_text(encoding="utf-8"),
        "client_email": "deployer@p.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path = directory / "key.json"
    path.write_text(json.dumps(key), encoding="utf-8")
    return path


def test_a_service_account_key_through_google_auth(
    tmp_path: Path, make_backend: MakeBackend, trusted: TLSFiles
) -> None:
    with OAuthServer("sa-token") as oauth:
        key = service_account_key(tmp_path, oauth.token_uri)
        source = default_token_source({}, service_account_json=str(key))
        assert isinstance(source, GoogleAuthTokenSource)
        assert source.description == f"the service account key {key} (deployer@p.iam.gserviceaccount.com)"
        backend = make_backend(StaticRepository({PIN: []}), token="sa-token", tls=trusted)
        with repository(backend, source) as repo:
            repo.list_metadata(request())
            repo.list_metadata(request())
        (claims,) = oauth.assertions()
    assert claims["iss"] == "deployer@p.iam.gserviceaccount.com"
    assert claims["scope"] == EMAIL_SCOPE


def test_a_bad_service_account_key_is_a_config_error(tmp_path: Path) -> None:
    pytest.importorskip("google.auth")
    with pytest.raises(ConfigError, match="cannot read the service account key"):
        default_token_source({}, service_account_json=str(tmp_path / "missing.json"))
    not_a_key = tmp_path / "other.json"
    not_a_key.write_text('{"type": "authorized_user"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="is not a service account JSON key"):
        default_token_source({}, service_account_json=str(not_a_key))


# -- Choosing as the Go CIPD client chooses ----------------------------------------------------------


def test_default_token_source_order(
    local_auth: LocalAuthServer, metadata: MetadataServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gce_host = {"GCE_METADATA_HOST": metadata.host}
    context = luci_context(local_auth, tmp_path)
    # 1. An explicit key wins; ":gce" is the metadata server.
    assert isinstance(
        default_token_source({**context, **gce_host}, service_account_json=":gce"), GceTokenSource
    )
    # 2. LUCI_CONTEXT with a default account.
    chosen = default_token_source({**context, **gce_host})
    assert isinstance(chosen, LuciContextTokenSource) and chosen.account == "task"
    # 3. Otherwise the luci-auth login: never GCE by itself, even on "GCE".
    assert isinstance(default_token_source(gce_host), LuciAuthTokenSource)
    without_default = luci_context(local_auth, tmp_path / "..", default=None)
    assert isinstance(default_token_source(without_default), LuciAuthTokenSource)
    with caplog.at_level(logging.WARNING, logger="cipdplugin"):
        unreadable = default_token_source({"LUCI_CONTEXT": str(tmp_path / "missing.json")})
    assert isinstance(unreadable, LuciAuthTokenSource)
    assert "LUCI_CONTEXT" in caplog.text
    # Choosing touched no server.
    assert local_auth.received == [] and metadata.received == []


def test_every_source_is_bounded_and_described(local_auth: LocalAuthServer, tmp_path: Path) -> None:
    sources: list[Any] = [
        LuciAuthTokenSource(),
        LuciContextTokenSource(luci_context(local_auth, tmp_path)),
        GceTokenSource(environ={}),
    ]
    for source in sources:
        assert isinstance(source, BoundedTokenSource)
        assert source.description and "secret" not in source.description.lower()
        assert local_auth.secret not in repr(source)


def test_google_auth_is_optional() -> None:
    script = (
        "import sys\n"
        "sys.modules['google.auth'] = None\n"
        "import cipdplugin\n"
        "from cipdplugin import ConfigError, default_token_source, PrpcRepository\n"
        "try:\n    default_token_source({}, service_account_json='/x.json')\n"
        "except ConfigError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=dict(os.environ),
    )
    assert "pip install 'cipdplugin[google-auth]'" in done.stdout
