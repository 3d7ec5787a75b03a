"""``PrpcRepository`` and the token sources against a real pRPC backend in a thread."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

import cipdplugin
from cipdplugin import (
    AdmissionDenied,
    AdmissionError,
    ClientOptions,
    Config,
    ConfigError,
    Host,
    InstanceMetadata,
    ListMetadataRequest,
    ListMetadataResponse,
    LuciAuthTokenSource,
    Pin,
    PrpcRepository,
    StaticRepository,
    instance_id_to_object_ref,
)
from cipdplugin.backend import encode_timeout
from tests.conftest import REPO_ROOT, SHA256_ID, hex_id, plugin_cmd, wait_until
from tests.prpc_backend import Fault, PrpcBackend, TLSFiles

PIN = Pin("ok/tool", hex_id(1))
ALLOWLIST_PLUGIN = REPO_ROOT / "examples" / "allowlist_plugin.py"
MakeBackend = Callable[..., PrpcBackend]


def entries(count: int) -> list[InstanceMetadata]:
    return [InstanceMetadata(key=f"k{i}", value=f"v{i}".encode()) for i in range(count)]


def request(pin: Pin = PIN, **fields: Any) -> ListMetadataRequest:
    return ListMetadataRequest(
        package=pin.package, instance=instance_id_to_object_ref(pin.instance_id), **fields
    )


def fast_repository(url: str, **kwargs: Any) -> PrpcRepository:
    """A repository with small retry delays: the tests stay fast, the rule is the same."""
    return PrpcRepository(url, initial_backoff=0.01, max_backoff=0.05, **kwargs)


class CountingTokens:
    """A token source that counts its calls."""

    def __init__(self, token: str = "t") -> None:
        self.token = token
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.token


@pytest.fixture
def backend(make_backend: MakeBackend) -> PrpcBackend:
    return make_backend(StaticRepository({PIN: entries(5)}))


@pytest.fixture
def repository(backend: PrpcBackend) -> Iterator[PrpcRepository]:
    with fast_repository(backend.url, timeout=5) as repo:
        yield repo


def failure(call: Callable[[], object]) -> AdmissionError:
    with pytest.raises(AdmissionError) as caught:
        call()
    return caught.value


# -- The protocol ----------------------------------------------------------------


def test_lists_metadata_as_the_backend_answers(backend: PrpcBackend, repository: PrpcRepository) -> None:
    answer = repository.list_metadata(request())
    assert answer == backend.repository.list_metadata(request())
    assert [md.key for md in answer.metadata] == ["k4", "k3", "k2", "k1", "k0"]


def test_request_headers_follow_prpc(backend: PrpcBackend, repository: PrpcRepository) -> None:
    repository.list_metadata(request(keys=["k1"], page_size=3))
    (received,) = backend.received
    assert received.path == "/prpc/cipd.Repository/ListMetadata"
    assert received.request == request(keys=["k1"], page_size=3)
    headers = received.headers
    assert headers["Content-Type"] == "application/prpc; encoding=binary"
    assert headers["Accept"] == "application/prpc; encoding=binary"
    assert headers["Host"] == backend.url.removeprefix("http://")
    assert headers["User-Agent"] == f"cipdplugin/{cipdplugin.__version__}"
    assert re.fullmatch(r"\d{1,8}[HMSmun]", headers["X-Prpc-Grpc-Timeout"])
    assert "Authorization" not in headers


def test_pages_follow_the_backends_tokens(repository: PrpcRepository) -> None:
    seen, token = [], ""
    while True:
        page = repository.list_metadata(request(page_size=2, page_token=token))
        seen += [md.key for md in page.metadata]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["k4", "k3", "k2", "k1", "k0"]


def test_timeout_header_encoding() -> None:
    assert encode_timeout(0.05) == "50000000n"
    assert encode_timeout(0.25) == "250000u"
    assert encode_timeout(30.0) == "30000000u"
    assert encode_timeout(1e-10) == "1n"
    assert encode_timeout(200_000.0) == "200000S"
    assert encode_timeout(1e9) == "16666667M"


def test_from_options_uses_the_url_and_proxy(tmp_path: Path) -> None:
    options = ClientOptions("https://cipd.example.com", proxy_url=f"unix://{tmp_path}/proxy.sock")
    repo = PrpcRepository.from_options(options, token_source=lambda: "t")
    assert (repo.service_url, repo.proxy_url, repo.sends_credentials) == (
        "https://cipd.example.com",
        f"unix://{tmp_path}/proxy.sock",
        False,
    )


def test_constructor_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="service_url"):
        PrpcRepository("https://cipd.example.com/prpc")
    with pytest.raises(ConfigError, match="proxy_url"):
        PrpcRepository("https://cipd.example.com", proxy_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="timeout"):
        PrpcRepository("https://cipd.example.com", timeout=0)
    assert PrpcRepository("HTTPS://cipd.example.com/").service_url == "https://cipd.example.com"


@pytest.mark.parametrize("name", ["timeout", "initial_backoff", "max_backoff"])
@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "1"])
def test_times_must_be_finite_and_positive(name: str, value: object) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        PrpcRepository("https://cipd.example.com", **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://a..b", "empty label"),
        ("https://.example.com", "empty label"),
        ("http://€.example", "IDNA does not allow"),
        ("https://exa mple.com", "spaces"),
        ("https://-bad.example.com", "may not begin or end with '-'"),
        ("https://" + "a" * 64 + ".com", "longer than 63"),
        ("https://cipd.example.com:99999", "out of range"),
        ("https://[::1", "IPv6"),
    ],
)
def test_a_service_url_no_request_could_reach_is_refused(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        PrpcRepository(url, environ={})


def test_an_internationalised_host_goes_out_in_ascii(make_backend: MakeBackend, tmp_path: Path) -> None:
    socket_path = tmp_path / "proxy.sock"
    proxy = make_backend(StaticRepository({PIN: entries(1)}), unix_socket=socket_path)
    with PrpcRepository("https://Bücher.example:8443", proxy_url=f"unix://{socket_path}", environ={}) as repo:
        repo.list_metadata(request())
    assert proxy.received[0].headers["Host"] == "xn--bcher-kva.example:8443"


def test_a_per_call_timeout_must_be_a_number(repository: PrpcRepository) -> None:
    with pytest.raises(TypeError, match="timeout"):
        repository.list_metadata(request(), timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        repository.list_metadata(request(), timeout=float("nan"))
    # No time left: no request at all.
    error = failure(lambda: repository.list_metadata(request(), timeout=-1))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED and "within 0 s" in error.message


def test_a_new_rpc_is_one_small_method(backend: PrpcBackend, repository: PrpcRepository) -> None:
    # Any method and message types go through the one generic call.
    answer = repository._call("cipd.Repository/ListMetadata", request(), ListMetadataResponse)
    assert len(answer.metadata) == 5
    error = failure(lambda: repository._call("cipd.Repository/NoSuchMethod", request(), ListMetadataResponse))
    assert error.code == grpc.StatusCode.UNIMPLEMENTED
    assert backend.received[-1].path == "/prpc/cipd.Repository/NoSuchMethod"


def test_the_first_failure_is_a_warning_and_retries_are_debug(
    backend: PrpcBackend, repository: PrpcRepository, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cipdplugin.backend")
    backend.inject(Fault("code", 14, "busy"), Fault("code", 14, "busy"), Fault("code", 14, "busy"))
    repository.list_metadata(request())
    failures = [(r.levelno, r.getMessage()) for r in caplog.records if "failed" in r.getMessage()]
    assert [level for level, _ in failures] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert f"to {backend.url} failed (UNAVAILABLE: busy); retry 1 in" in failures[0][1]
    waits = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert waits == [f"cipd.Repository/ListMetadata: waiting on {backend.url} (up to 5 s)"]


# -- Errors and retries ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (7, grpc.StatusCode.PERMISSION_DENIED),
        (5, grpc.StatusCode.NOT_FOUND),
        (3, grpc.StatusCode.INVALID_ARGUMENT),
        (16, grpc.StatusCode.UNAUTHENTICATED),
        (9, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_permanent_backend_errors_pass_through_at_once(
    backend: PrpcBackend, repository: PrpcRepository, code: int, status: grpc.StatusCode
) -> None:
    backend.inject(Fault("code", code, "the backend's own words\n"))
    error = failure(lambda: repository.list_metadata(request()))
    assert (error.code, error.message) == (status, "the backend's own words")
    assert len(backend.received) == 1


@pytest.mark.parametrize("code", [14, 13, 2])
def test_transient_codes_are_retried(backend: PrpcBackend, repository: PrpcRepository, code: int) -> None:
    backend.inject(Fault("code", code, "try again"), Fault("code", code, "try again"))
    assert len(repository.list_metadata(request()).metadata) == 5
    assert len(backend.received) == 3


def test_a_lasting_transient_error_is_reported_as_the_backend_said(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.inject(*[Fault("code", 14, "backend is overloaded")] * 1000)
    with fast_repository(backend.url, timeout=0.5) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert (error.code, error.message) == (grpc.StatusCode.UNAVAILABLE, "backend is overloaded")
    assert len(backend.received) > 2


def test_an_html_503_page_is_retried_then_unavailable(make_backend: MakeBackend) -> None:
    backend = make_backend(StaticRepository({PIN: entries(1)}))
    backend.inject(Fault("html-503"))
    with fast_repository(backend.url, timeout=5) as repo:
        assert len(repo.list_metadata(request()).metadata) == 1
        backend.inject(*[Fault("html-503")] * 1000)
        repo.timeout = 0.3
        error = failure(lambda: repo.list_metadata(request()))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    for text in ("HTTP 503", "X-Prpc-Grpc-Code", "text/html", "503 Service Unavailable"):
        assert text in error.message


def test_a_non_prpc_4xx_answer_is_internal_and_final(
    backend: PrpcBackend, repository: PrpcRepository
) -> None:
    backend.inject(Fault("no-code", status=404, message="404 page not found"))
    error = failure(lambda: repository.list_metadata(request()))
    assert error.code == grpc.StatusCode.INTERNAL
    assert "not a pRPC server" in error.message and "HTTP 404" in error.message
    assert "404 page not found" in error.message
    assert len(backend.received) == 1


def test_a_body_that_does_not_decode_is_internal(backend: PrpcBackend, repository: PrpcRepository) -> None:
    backend.inject(Fault("garbage"))
    error = failure(lambda: repository.list_metadata(request()))
    assert error.code == grpc.StatusCode.INTERNAL
    assert "does not decode as a cipd.ListMetadataResponse" in error.message
    assert "5 bytes: 0a 05 61 62 63" in error.message


def test_an_answer_slower_than_the_timeout_is_deadline_exceeded(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.inject(Fault("slow", seconds=30))
    with fast_repository(backend.url, timeout=0.3) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.message == f"no answer from {backend.url} within 0.3 s"


def test_no_backend_listening_is_unavailable_after_retries(make_backend: MakeBackend) -> None:
    backend = make_backend()
    url = backend.url
    backend.close()
    with fast_repository(url, timeout=0.3) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert f"cannot reach {url}" in error.message


def test_a_dropped_connection_is_retried(backend: PrpcBackend, repository: PrpcRepository) -> None:
    repository.list_metadata(request())  # leaves a kept-alive connection to reuse
    backend.inject(Fault("close"), Fault("close"))
    assert len(repository.list_metadata(request()).metadata) == 5


def test_closing_ends_a_call_waiting_to_retry(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.inject(*[Fault("code", 14, "down")] * 10)
    repo = PrpcRepository(backend.url, timeout=60, initial_backoff=30, max_backoff=30)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(repo.list_metadata, request())
        assert wait_until(lambda: len(backend.received) == 1)
        repo.close()
        error = call.exception(timeout=10)
    assert isinstance(error, AdmissionError) and error.code == grpc.StatusCode.CANCELLED


# -- Connections ------------------------------------------------------------------


def test_sequential_calls_reuse_one_connection(backend: PrpcBackend, repository: PrpcRepository) -> None:
    for _ in range(10):
        repository.list_metadata(request())
    assert backend.connections == 1


def test_concurrent_calls_are_answered_correctly(make_backend: MakeBackend) -> None:
    pins = [Pin("pkg/many", hex_id(n)) for n in range(20)]
    backend = make_backend(StaticRepository({pin: entries(n % 4) for n, pin in enumerate(pins)}))
    with fast_repository(backend.url, timeout=10) as repo, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda pin: repo.list_metadata(request(pin)), pins * 5))
    assert [len(answer.metadata) for answer in answers] == [n % 4 for n in range(20)] * 5
    # Connections are reused: no more than the calls at once.
    assert backend.connections <= 8


# -- Credentials, TLS and the proxy ---------------------------------------------------


@pytest.fixture
def trusted(tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch) -> TLSFiles:
    """Trust the test CA the way a user would: SSL_CERT_FILE."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    return tls_files


def test_tls_with_a_bearer_token_cached(make_backend: MakeBackend, trusted: TLSFiles) -> None:
    backend = make_backend(StaticRepository({PIN: entries(2)}), token="s3cret", tls=trusted)
    tokens = CountingTokens("s3cret")
    with PrpcRepository(backend.url, token_source=tokens, timeout=5) as repo:
        for _ in range(3):
            assert len(repo.list_metadata(request()).metadata) == 2
    assert tokens.calls == 1
    assert {r.headers["Authorization"] for r in backend.received} == {"Bearer s3cret"}
    assert backend.connections == 1


def test_a_token_about_to_expire_is_fetched_again(make_backend: MakeBackend, trusted: TLSFiles) -> None:
    backend = make_backend(token="soon", tls=trusted)
    calls = []

    def token_source() -> tuple[str, float]:
        calls.append(1)
        return "soon", time.time() + 8  # within luci's 10 s minimum lifetime

    with PrpcRepository(backend.url, token_source=token_source, timeout=5) as repo:
        repo.list_metadata(request())
        repo.list_metadata(request())
    assert len(calls) == 2


def test_a_wrong_token_is_unauthenticated(make_backend: MakeBackend, trusted: TLSFiles) -> None:
    backend = make_backend(token="right", tls=trusted)
    with PrpcRepository(backend.url, token_source=lambda: ("wrong", 4e9), timeout=5) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert (error.code, error.message) == (grpc.StatusCode.UNAUTHENTICATED, "missing or wrong OAuth2 token")


def test_a_failing_token_source_is_unauthenticated(make_backend: MakeBackend, trusted: TLSFiles) -> None:
    backend = make_backend(tls=trusted)

    def broken() -> str:
        raise RuntimeError("no refresh token")

    with PrpcRepository(backend.url, token_source=broken, timeout=5) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "no refresh token" in error.message
    assert backend.received == []


def test_an_untrusted_certificate_is_unavailable_at_once(
    make_backend: MakeBackend, tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(tls=tls_files)
    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(empty / "missing.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))
    with fast_repository(backend.url, timeout=5) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "not trusted" in error.message and "SSL_CERT_FILE" in error.message
    assert backend.received == []


def test_no_credentials_to_an_http_backend(backend: PrpcBackend) -> None:
    tokens = CountingTokens()
    with PrpcRepository(backend.url, token_source=tokens, timeout=5) as repo:
        repo.list_metadata(request())
    assert tokens.calls == 0
    assert "Authorization" not in backend.received[0].headers


def test_through_the_unix_socket_proxy(make_backend: MakeBackend, tmp_path: Path) -> None:
    socket_path = tmp_path / "proxy.sock"
    proxy = make_backend(StaticRepository({PIN: entries(3)}), unix_socket=socket_path)
    tokens = CountingTokens()
    with PrpcRepository(
        "https://cipd.example.com:8443",
        proxy_url=f"unix://{socket_path}",
        token_source=tokens,
        timeout=5,
    ) as repo:
        for _ in range(3):
            assert len(repo.list_metadata(request()).metadata) == 3
    assert tokens.calls == 0
    assert [r.headers["Host"] for r in proxy.received] == ["cipd.example.com:8443"] * 3
    assert all("Authorization" not in r.headers for r in proxy.received)


def test_a_missing_proxy_socket_is_unavailable(tmp_path: Path) -> None:
    with PrpcRepository(
        "https://cipd.example.com", proxy_url=f"unix://{tmp_path}/none.sock", timeout=0.2
    ) as repo:
        error = failure(lambda: repo.list_metadata(request()))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert f"the CIPD proxy at {tmp_path}/none.sock" in error.message


# -- LuciAuthTokenSource ----------------------------------------------------------


def fake_luci_auth(directory: Path, body: str) -> Path:
    """An executable ``luci-auth`` running ``body`` (Python, ``argv`` in scope)."""
    script = directory / "luci-auth"
    script.write_text(f"#!{sys.executable}\nimport sys\nargv = sys.argv[1:]\n{body}\n", encoding="utf-8")
    script.chmod(0o755)
    return script


def test_luci_auth_token_json_output(tmp_path: Path) -> None:
    script = fake_luci_auth(
        tmp_path,
        "assert argv[:3] == ['token', '-json-output', '-'], argv\n"
        "assert argv[3] == '-lifetime' and argv[4].endswith('s'), argv\n"
        'print(\'{"token": "ya29.abc", "expiry": 1900000000}\')',
    )
    assert LuciAuthTokenSource(str(script))() == ("ya29.abc", 1900000000.0)


def test_luci_auth_not_logged_in(tmp_path: Path) -> None:
    script = fake_luci_auth(tmp_path, "print('Not logged in.', file=sys.stderr); sys.exit(2)")
    error = failure(LuciAuthTokenSource(str(script)))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "exit status 2" in error.message and "Not logged in." in error.message
    assert "luci-auth login" in error.message


def test_luci_auth_missing(tmp_path: Path) -> None:
    error = failure(LuciAuthTokenSource(str(tmp_path / "luci-auth")))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "was not found" in error.message and "luci-auth login" in error.message


def test_luci_auth_unexpected_output(tmp_path: Path) -> None:
    script = fake_luci_auth(tmp_path, "print('ya29.plain')")
    error = failure(LuciAuthTokenSource(str(script)))
    assert "not a JSON token" in error.message


def test_luci_auth_tokens_reach_the_backend(
    make_backend: MakeBackend, trusted: TLSFiles, tmp_path: Path
) -> None:
    script = fake_luci_auth(tmp_path, 'print(\'{"token": "from-luci-auth", "expiry": 4000000000}\')')
    backend = make_backend(StaticRepository({PIN: entries(1)}), token="from-luci-auth", tls=trusted)
    with PrpcRepository(backend.url, token_source=LuciAuthTokenSource(str(script)), timeout=10) as repo:
        assert len(repo.list_metadata(request()).metadata) == 1


# -- End to end: Host, PrpcRepository and plugins that read metadata -------------------


def test_host_plugin_and_backend(backend: PrpcBackend, make_host: Callable[..., Host]) -> None:
    backend.repository = StaticRepository({PIN: [InstanceMetadata(key="allow", value=b"yes")]})
    with PrpcRepository(backend.url, timeout=5) as repo:
        host = make_host(Config(repo.service_url, repo))
        plugin = host.new_admission_plugin(plugin_cmd("metadata"))
        assert plugin.check_admission(PIN).exception(timeout=30) is None
        denied = plugin.check_admission(Pin("ok/tool", hex_id(2))).exception(timeout=30)
    assert isinstance(denied, AdmissionDenied) and denied.message == "no 'allow' metadata"


def test_a_backend_error_reaches_the_plugin_and_the_host(
    backend: PrpcBackend, make_host: Callable[..., Host]
) -> None:
    backend.inject(Fault("code", 7, "caller lacks cipd.instances.get"))
    with PrpcRepository(backend.url, timeout=5) as repo:
        host = make_host(Config(repo.service_url, repo))
        error = host.new_admission_plugin(plugin_cmd("metadata")).check_admission(PIN).exception(timeout=30)
    assert isinstance(error, AdmissionError) and not isinstance(error, AdmissionDenied)
    assert (error.code, error.message) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "caller lacks cipd.instances.get",
    )


def test_allowlist_example_plugin_against_the_backend(
    make_backend: MakeBackend, make_host: Callable[..., Host]
) -> None:
    allowed = Pin("infra/tool", SHA256_ID)
    digest = instance_id_to_object_ref(SHA256_ID).hex_digest
    other = Pin("infra/tool", "B" + SHA256_ID[1:])
    noise = [InstanceMetadata(key="allowed-sha256", value=f"{n:064x}".encode()) for n in range(150)]
    backend = make_backend(
        StaticRepository({allowed: [*noise, InstanceMetadata(key="allowed-sha256", value=digest.encode())]})
    )
    with PrpcRepository(backend.url, timeout=5) as repo:
        host = make_host(Config(repo.service_url, repo))
        plugin = host.new_admission_plugin([sys.executable, str(ALLOWLIST_PLUGIN)])
        assert plugin.check_admission(allowed).exception(timeout=30) is None
        denied = plugin.check_admission(other).exception(timeout=30)
    assert isinstance(denied, AdmissionDenied)
    assert "(0 entries looked at)" in denied.message
