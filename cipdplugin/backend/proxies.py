"""Which HTTP proxy a request goes through: the machine's environment, read as Go reads it.

The Go CIPD client sends its requests through Go's ``http.DefaultTransport``,
whose proxy comes from ``http.ProxyFromEnvironment``, that is
``golang.org/x/net/http/httpproxy`` (``proxy.go``). The same rules here:

* ``HTTPS_PROXY`` (else ``https_proxy``) for https URLs, ``HTTP_PROXY`` (else
  ``http_proxy``) for http URLs; an empty value is unset.
* A value without an http, https or socks5 scheme is read as ``http://`` +
  value (``proxy:3128`` is ``http://proxy:3128``); a missing port is the
  scheme's (80 for http).
* Credentials in the proxy URL (``http://user:pass@proxy``) become
  ``Proxy-Authorization: Basic ...``, sent to the proxy only.
* ``NO_PROXY`` (else ``no_proxy``): comma-separated entries, each an IP
  address, a CIDR block, a domain name or ``*`` (nothing is proxied); an IP
  or a domain may carry a port (``1.2.3.4:80``, ``[::1]:80``, ``foo.com:443``).
  ``foo.com`` covers foo.com and its subdomains, ``.foo.com`` and
  ``*.foo.com`` its subdomains only. Malformed entries are ignored.
* ``localhost`` and loopback addresses are never proxied.
* In a CGI process (``REQUEST_METHOD`` set) ``HTTP_PROXY`` is refused: a
  client could set it through the ``Proxy:`` header (golang.org/s/cgihttpproxy).

Where Go is lenient, this module is strict: a proxy value Go cannot parse
(Go then silently uses no proxy) and a proxy this client cannot speak
(https:// or socks5://) raise ``ConfigError`` naming the variable, so that a
machine's proxy is never silently bypassed.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from cipdplugin.backend.hosts import ascii_host
from cipdplugin.options import ConfigError

DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where it listens and what to tell it.

    ``shown`` names it in messages, without its credentials.
    """

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)

    @property
    def shown(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class _Exemption:
    """One NO_PROXY entry: a network, an address or a domain, with an optional port."""

    network: IPNetwork | None = None
    address: IPAddress | None = None
    domain: str = ""  # with its leading dot
    domain_itself: bool = False  # "foo.com" covers foo.com; ".foo.com" does not
    port: str = ""

    def covers(self, host: str, port: str, ip: IPAddress | None) -> bool:
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        if self.address is not None:
            return ip == self.address and self.port in ("", port)
        if host.endswith(self.domain) or (self.domain_itself and host == self.domain[1:]):
            return self.port in ("", port)
        return False


@dataclass(frozen=True)
class ProxyRules:
    """The proxies of ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY``, parsed once."""

    http: Proxy | None = None
    https: Proxy | None = None
    exempt_all: bool = False
    exemptions: tuple[_Exemption, ...] = ()
    cgi: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ProxyRules:
        """The rules in ``environ``.

        Raises:
            ConfigError: a proxy variable holds a URL that cannot be parsed,
                or a proxy of a kind this client does not speak.
        """
        exempt_all, exemptions = _parse_no_proxy(_first(environ, "NO_PROXY", "no_proxy")[1])
        return cls(
            http=_parse_proxy(*_first(environ, "HTTP_PROXY", "http_proxy")),
            https=_parse_proxy(*_first(environ, "HTTPS_PROXY", "https_proxy")),
            exempt_all=exempt_all,
            exemptions=exemptions,
            cgi=bool(environ.get("REQUEST_METHOD")),
        )

    def proxy_for(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for a request to ``scheme://host:port`` (``host`` in ASCII); None: direct.

        Raises:
            ConfigError: an http request in a CGI process would use HTTP_PROXY.
        """
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None or not self.uses_proxy(host, port):
            return None
        if scheme == "http" and self.cgi:
            raise ConfigError(
                "refusing to use HTTP_PROXY in a CGI process (REQUEST_METHOD is set): a client "
                "could have set it with a Proxy: header; see golang.org/s/cgihttpproxy"
            )
        return proxy

    def uses_proxy(self, host: str, port: int) -> bool:
        """Whether ``host:port`` goes through a proxy, by NO_PROXY and the loopback rule."""
        host = host.strip().lower()
        if host == "localhost":
            return False
        ip = _address(host)
        if ip is not None and _is_loopback(ip):
            return False
        if self.exempt_all:
            return False
        return not any(rule.covers(host, str(port), ip) for rule in self.exemptions)


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str]:
    """The first of ``names`` set to a non-empty value, and that value."""
    for name in names:
        value = environ.get(name, "")
        if value:
            return name, value
    return names[0], ""


def _parse_proxy(name: str, value: str) -> Proxy | None:
    if not value:
        return None
    url = value
    try:
        scheme = urllib.parse.urlsplit(value).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme not in DEFAULT_PORTS:
        url = "http://" + value  # Go's rule: "host[:port]" means an http proxy
    # The value may hold a password: messages show the variable, not the value.
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"${name} is not a valid proxy URL ({_reason(exc)})") from None
    scheme = parts.scheme.lower()
    if scheme != "http":
        raise ConfigError(
            f"${name} names a {scheme}:// proxy; only http:// proxies are supported "
            "(an https backend is still reached through an encrypted CONNECT tunnel)"
        )
    if not parts.hostname:
        raise ConfigError(f"${name} names no proxy host")
    try:
        host = ascii_host(parts.hostname)
    except ValueError as exc:
        raise ConfigError(f"${name} has an invalid proxy host: {exc}") from None
    authorization = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {credentials}"
    return Proxy(host, port if port is not None else DEFAULT_PORTS[scheme], authorization)


def _reason(exc: ValueError) -> str:
    # urllib's messages quote the port it could not read, never the password.
    text = str(exc)
    return text if "@" not in text else "malformed URL"


def _parse_no_proxy(value: str) -> tuple[bool, tuple[_Exemption, ...]]:
    """NO_PROXY as Go's ``config.init`` reads it: (everything exempt, the entries)."""
    exemptions: list[_Exemption] = []
    for raw in value.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True, ()
        if "/" in entry:
            # Not a CIDR block: Go ignores it too (no domain has a "/").
            with contextlib.suppress(ValueError):
                exemptions.append(_Exemption(network=ipaddress.ip_network(entry, strict=False)))
            continue
        host, port = _split_host_port(entry)
        address = _address(host)
        if address is not None:
            exemptions.append(_Exemption(address=address, port=port))
            continue
        if not host:
            continue
        if host.startswith("*."):
            host = host[1:]
        domain_itself = not host.startswith(".")
        domain = host if host.startswith(".") else "." + host
        with contextlib.suppress(ValueError):  # kept as written, as Go keeps a name its IDNA refuses
            domain = "." + ascii_host(domain[1:]) if domain[1:] else domain
        exemptions.append(_Exemption(domain=domain, domain_itself=domain_itself, port=port))
    return False, tuple(exemptions)


def _split_host_port(entry: str) -> tuple[str, str]:
    """``host:port``, ``[v6]:port`` or a bare host (an IPv6 address has colons of its own)."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if bracket and rest.startswith(":"):
            return host, rest[1:]
        return (host, "") if bracket and not rest else (entry, "")
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, ""


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_loopback(ip: IPAddress) -> bool:
    # Go's IsLoopback sees an IPv4-mapped ::ffff:127.0.0.1 as loopback too.
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
