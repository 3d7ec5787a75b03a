"""Proxies as the Go client uses them (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``), and the user agent."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

import cipdplugin
from cipdplugin import (
    AdmissionError,
    ConfigError,
    InstanceMetadata,
    ListMetadataRequest,
    Pin,
    PrpcRepository,
    StaticRepository,
    instance_id_to_object_ref,
)
from cipdplugin.backend.proxies import ProxyRules
from tests.conftest import hex_id
from tests.proxy_servers import HttpProxy
from tests.prpc_backend import PrpcBackend, TLSFiles

PIN = Pin("ok/tool", hex_id(1))
TOKEN = "ya29.backend-only"
MakeBackend = Callable[..., PrpcBackend]


def request() -> ListMetadataRequest:
    return ListMetadataRequest(package=PIN.package, instance=instance_id_to_object_ref(PIN.instance_id))


def rules(**environ: str) -> ProxyRules:
    return ProxyRules.from_environ(environ)


def proxied(no_proxy: str, host: str, port: int = 443) -> bool:
    return rules(HTTPS_PROXY="proxy.test:3128", NO_PROXY=no_proxy).proxy_for("https", host, port) is not None


# -- Which proxy ------------------------------------------------------------------------------


def test_each_scheme_has_its_variable() -> None:
    both = rules(HTTPS_PROXY="http://secure.test:1", HTTP_PROXY="http://plain.test:2")
    assert both.proxy_for("https", "cipd.example.com", 443) == both.https
    assert both.https is not None and (both.https.host, both.https.port) == ("secure.test", 1)
    assert both.http is not None and (both.http.host, both.http.port) == ("plain.test", 2)
    assert rules(HTTP_PROXY="http://plain.test:2").proxy_for("https", "cipd.example.com", 443) is None
    assert rules(HTTPS_PROXY="http://secure.test:1").proxy_for("http", "cipd.example.com", 80) is None


def test_upper_case_wins_and_lower_case_is_read_too() -> None:
    assert rules(https_proxy="http://lower.test:1").https == rules(HTTPS_PROXY="http://lower.test:1").https
    chosen = rules(HTTPS_PROXY="http://upper.test:1", https_proxy="http://lower.test:1").https
    assert chosen is not None and chosen.host == "upper.test"
    # An empty value is unset: the other spelling is read.
    chosen = rules(HTTPS_PROXY="", https_proxy="http://lower.test:1").https
    assert chosen is not None and chosen.host == "lower.test"


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("proxy.test:3128", "proxy.test", 3128),
        ("proxy.test", "proxy.test", 80),
        ("10.0.0.1:8080", "10.0.0.1", 8080),
        ("http://proxy.test", "proxy.test", 80),
        ("HTTP://Proxy.Test:81/ignored/path", "proxy.test", 81),
        ("[2001:db8::1]:3128", "2001:db8::1", 3128),
    ],
)
def test_a_proxy_without_a_scheme_is_http(value: str, host: str, port: int) -> None:
    proxy = rules(HTTPS_PROXY=value).https
    assert proxy is not None and (proxy.host, proxy.port, proxy.authorization) == (host, port, None)


def test_credentials_in_the_proxy_url_become_proxy_authorization() -> None:
    proxy = rules(HTTPS_PROXY="http://bot%40corp:p%3Ass@proxy.test:3128").https
    assert proxy is not None
    assert proxy.authorization == "Basic " + base64.b64encode(b"bot@corp:p:ss").decode()
    assert "p:ss" not in repr(proxy) and "p%3Ass" not in proxy.shown


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("https://user:hunter2@proxy.test:443", "https:// proxy"),
        ("socks5://user:hunter2@proxy.test:1080", "socks5:// proxy"),
        ("http://user:hunter2@proxy.test:notaport", "not a valid proxy URL"),
        ("http://user:hunter2@", "no proxy host"),
    ],
)
def test_an_unusable_proxy_is_a_config_error_without_its_password(value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rules(HTTPS_PROXY=value)
    assert "HTTPS_PROXY" in str(caught.value) and reason in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_http_proxy_is_refused_in_a_cgi_process() -> None:
    cgi = rules(
        HTTP_PROXY="http://proxy.test:3128", HTTPS_PROXY="http://proxy.test:3128", REQUEST_METHOD="GET"
    )
    with pytest.raises(ConfigError, match="CGI"):
        cgi.proxy_for("http", "cipd.example.com", 80)
    assert cgi.proxy_for("https", "cipd.example.com", 443) is not None


# -- NO_PROXY, as golang.org/x/net/http/httpproxy reads it ------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "expected"),
    [
        ("", "cipd.example.com", 443, True),
        ("*", "cipd.example.com", 443, False),
        ("other.com, *", "cipd.example.com", 443, False),
        # A domain covers itself and its subdomains, not other names ending alike.
        ("example.com", "example.com", 443, False),
        ("example.com", "cipd.example.com", 443, False),
        ("example.com", "badexample.com", 443, True),
        ("EXAMPLE.COM", "cipd.example.com", 443, False),
        # A leading dot (or "*.") covers the subdomains only.
        (".example.com", "cipd.example.com", 443, False),
        (".example.com", "example.com", 443, True),
        ("*.example.com", "cipd.example.com", 443, False),
        ("*.example.com", "example.com", 443, True),
        # A port narrows an entry to it.
        ("example.com:443", "cipd.example.com", 443, False),
        ("example.com:443", "cipd.example.com", 8443, True),
        # Addresses and blocks.
        ("10.1.2.3", "10.1.2.3", 443, False),
        ("10.1.2.3", "10.1.2.4", 443, True),
        ("10.1.2.3:8443", "10.1.2.3", 443, True),
        ("10.1.2.3:8443", "10.1.2.3", 8443, False),
        ("10.0.0.0/8", "10.200.3.4", 443, False),
        ("10.0.0.0/8", "11.0.0.1", 443, True),
        ("2001:db8::/32", "2001:db8::7", 443, False),
        ("[2001:db8::1]:443", "2001:db8::1", 443, False),
        ("[2001:db8::1]:443", "2001:db8::1", 80, True),
        ("2001:db8::1", "2001:db8::1", 443, False),
        # Several entries, spaces, and malformed ones ignored.
        (" a.test ,, :80, x/y, example.com ", "cipd.example.com", 443, False),
        (":80", "cipd.example.com", 80, True),
        # Internationalised names compare in their ASCII form.
        ("bücher.example", "xn--bcher-kva.example", 443, False),
    ],
)
def test_no_proxy_rules(no_proxy: str, host: str, port: int, expected: bool) -> None:
    assert proxied(no_proxy, host, port) is expected


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST", "127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"]
)
def test_loopback_is_never_proxied(host: str) -> None:
    assert proxied("", host) is False
    assert rules(HTTP_PROXY="proxy.test:3128").proxy_for("http", host.lower(), 80) is None


# -- Through real proxies ---------------------------------------------------------------------


@pytest.fixture
def tls_backend(
    make_backend: MakeBackend, tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch
) -> PrpcBackend:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    return make_backend(
        StaticRepository({PIN: [InstanceMetadata(key="k", value=b"v")]}), token=TOKEN, tls=tls_files
    )


@pytest.fixture
def proxy_for(tls_backend: PrpcBackend) -> Iterator[Callable[..., HttpProxy]]:
    proxies: list[HttpProxy] = []

    def make(upstreams: dict[str, tuple[str, int]], **kwargs: object) -> HttpProxy:
        proxy = HttpProxy(upstreams, **kwargs)  # type: ignore[arg-type]
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


def _port(backend: PrpcBackend) -> int:
    return int(backend.url.rpartition(":")[2])


def test_an_https_backend_through_a_connect_tunnel(
    tls_backend: PrpcBackend, proxy_for: Callable[..., HttpProxy]
) -> None:
    port = _port(tls_backend)
    proxy = proxy_for({f"backend.test:{port}": ("127.0.0.1", port)}, credentials=("bot", "pw:1"))
    environ = {"HTTPS_PROXY": f"http://bot:pw%3A1@127.0.0.1:{proxy.port}"}
    with PrpcRepository(
        f"https://backend.test:{port}", token_source=lambda: TOKEN, timeout=10, environ=environ
    ) as repo:
        assert repo.target == f"https://backend.test:{port} (through the proxy http://127.0.0.1:{proxy.port})"
        for _ in range(3):
            assert [md.key for md in repo.list_metadata(request()).metadata] == ["k"]
    (connect,) = proxy.seen  # one tunnel, kept alive for all three calls
    assert (connect.method, connect.target) == ("CONNECT", f"backend.test:{port}")
    assert connect.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"bot:pw:1").decode()
    assert "authorization" not in connect.headers  # the token never goes to the proxy
    assert TOKEN.encode() not in proxy.tunneled  # nor in the clear through the tunnel
    received = tls_backend.received
    assert [r.headers["Authorization"] for r in received] == [f"Bearer {TOKEN}"] * 3
    assert all("Proxy-Authorization" not in r.headers for r in received)
    assert {r.headers["Host"] for r in received} == {f"backend.test:{port}"}


def test_tls_through_the_tunnel_checks_the_backends_own_name(
    tls_backend: PrpcBackend, proxy_for: Callable[..., HttpProxy]
) -> None:
    port = _port(tls_backend)
    # The proxy sends "other.test" to a server whose certificate does not name it.
    proxy = proxy_for({f"other.test:{port}": ("127.0.0.1", port)})
    environ = {"HTTPS_PROXY": f"127.0.0.1:{proxy.port}"}
    repo = PrpcRepository(f"https://other.test:{port}", token_source=lambda: TOKEN, environ=environ)
    with repo, pytest.raises(AdmissionError) as caught:
        repo.list_metadata(request())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "not trusted" in caught.value.message and "other.test" in caught.value.message
    assert tls_backend.received == []


def test_a_proxy_refusing_the_tunnel_is_unavailable(
    tls_backend: PrpcBackend, proxy_for: Callable[..., HttpProxy]
) -> None:
    port = _port(tls_backend)
    proxy = proxy_for({f"backend.test:{port}": ("127.0.0.1", port)}, credentials=("bot", "right"))
    environ = {"HTTPS_PROXY": f"http://bot:wrong@127.0.0.1:{proxy.port}"}
    repo = PrpcRepository(f"https://backend.test:{port}", token_source=lambda: TOKEN, environ=environ)
    with repo, pytest.raises(AdmissionError) as caught:
        repo.list_metadata(request())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.message == (
        f"the proxy http://127.0.0.1:{proxy.port} refused the tunnel to backend.test:{port}: "
        "HTTP 407 Proxy Authentication Required"
    )
    assert "wrong" not in caught.value.message
    assert len(proxy.seen) == 1  # a refusal is final


def test_an_http_backend_through_a_forward_proxy(make_backend: MakeBackend) -> None:
    backend = make_backend(StaticRepository({PIN: [InstanceMetadata(key="k", value=b"v")]}))
    port = _port(backend)
    with HttpProxy({f"backend.test:{port}": ("127.0.0.1", port)}, credentials=("bot", "pw")) as proxy:
        environ = {"HTTP_PROXY": f"bot:pw@127.0.0.1:{proxy.port}", "HTTPS_PROXY": "http://unused.test:1"}
        with PrpcRepository(
            f"http://backend.test:{port}", token_source=lambda: TOKEN, environ=environ
        ) as repo:
            for _ in range(3):  # the proxy closes each connection after its answer
                assert [md.key for md in repo.list_metadata(request()).metadata] == ["k"]
        seen = proxy.seen
    assert [(s.method, s.target) for s in seen] == [
        ("POST", f"http://backend.test:{port}/prpc/cipd.Repository/ListMetadata")
    ] * 3
    assert all(
        s.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"bot:pw").decode() for s in seen
    )
    assert all("authorization" not in s.headers for s in seen)  # no token to http backends
    assert [r.headers["Host"] for r in backend.received] == [f"backend.test:{port}"] * 3
    assert all("Proxy-Authorization" not in r.headers for r in backend.received)


def test_loopback_backends_go_direct_whatever_the_proxy(
    tls_backend: PrpcBackend, proxy_for: Callable[..., HttpProxy]
) -> None:
    proxy = proxy_for({})
    environ = {"HTTPS_PROXY": proxy.url, "HTTP_PROXY": proxy.url}
    with PrpcRepository(tls_backend.url, token_source=lambda: TOKEN, environ=environ) as repo:
        repo.list_metadata(request())
    assert proxy.seen == []
    assert len(tls_backend.received) == 1


def test_the_cipd_proxy_wins_over_http_proxies(make_backend: MakeBackend, tmp_path: Path) -> None:
    socket_path = tmp_path / "cipd-proxy.sock"
    cipd_proxy = make_backend(StaticRepository({PIN: [InstanceMetadata(key="k")]}), unix_socket=socket_path)
    with HttpProxy({}) as http_proxy:
        environ = {"CIPD_PROXY_URL": f"unix://{socket_path}", "HTTPS_PROXY": http_proxy.url}
        with PrpcRepository("https://cipd.example.com", token_source=lambda: TOKEN, environ=environ) as repo:
            assert not repo.sends_credentials
            repo.list_metadata(request())
        assert http_proxy.seen == []
    assert [r.headers["Host"] for r in cipd_proxy.received] == ["cipd.example.com"]
    assert "Authorization" not in cipd_proxy.received[0].headers


# -- The user agent ---------------------------------------------------------------------------


def test_the_user_agent_names_cipdplugin_after_the_prefix(make_backend: MakeBackend) -> None:
    backend = make_backend(StaticRepository({PIN: []}))
    own = f"cipdplugin/{cipdplugin.__version__}"
    with PrpcRepository(backend.url, environ={}) as plain:
        plain.list_metadata(request())
    with PrpcRepository(
        backend.url, environ={"CIPD_HTTP_USER_AGENT_PREFIX": "depot_tools/abc123"}
    ) as prefixed:
        prefixed.list_metadata(request())
    assert [r.headers["User-Agent"] for r in backend.received] == [own, f"depot_tools/abc123/{own}"]


def test_a_user_agent_prefix_that_would_break_the_header_is_refused() -> None:
    with pytest.raises(ConfigError, match="CIPD_HTTP_USER_AGENT_PREFIX"):
        PrpcRepository("https://cipd.example.com", environ={"CIPD_HTTP_USER_AGENT_PREFIX": "x\r\nX-Evil: 1"})
