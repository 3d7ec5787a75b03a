"""Connections to one origin, within a call's deadline: direct, through a proxy, or a unix socket.

A ``Route`` says how one origin is reached, fixed when a client is built:

* directly over TCP (TLS for https, the origin's name verified);
* through an HTTP proxy (``proxies.py``): an http origin gets its requests
  as absolute URLs (a forward proxy), an https origin a ``CONNECT`` tunnel
  in which TLS is spoken end to end with the origin, its name verified
  there: the proxy sees neither the request nor its token. Only the proxy
  gets ``Proxy-Authorization``, and only the origin any other header;
* or through the CIPD proxy's unix socket, as plain HTTP.

Connecting, the tunnel and the TLS handshake all end by the call's
deadline. Name resolution is the exception: ``getaddrinfo`` cannot be
interrupted, so it is bounded by the system resolver's own limits
(``resolv.conf``: 5 s per try, 2 tries by default); the deadline is checked
again as soon as it returns.

``ConnectionPool`` keeps idle keep-alive connections for one route. It is
safe across ``fork()``: the child forgets every connection the parent holds
(closing its copies of the descriptors, which leaves the parent's untouched)
and opens its own, so two processes never read answers from one socket.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cipdplugin.backend import forks
from cipdplugin.backend.hosts import Origin
from cipdplugin.backend.proxies import Proxy
from cipdplugin.backend.wire import (
    DeadlineExpired,
    Reader,
    Response,
    WireError,
    format_request,
    read_response,
    send_all,
    wait_bound,
)
from cipdplugin.deadline import Deadline


class TunnelRefused(WireError):
    """The proxy answered the CONNECT with something else than 200."""


@dataclass(frozen=True)
class Route:
    """How requests reach one origin.

    Attributes:
        origin: the backend (or token server) the requests are for.
        proxy: the HTTP proxy in between, if any.
        unix_socket: the CIPD proxy's socket, if any (then plain HTTP).
    """

    origin: Origin
    proxy: Proxy | None = None
    unix_socket: str | None = None

    @property
    def shown(self) -> str:
        """The route in messages: the origin, and the proxy it goes through (no credentials)."""
        base = f"{self.origin.scheme}://{self.origin.authority}"
        if self.unix_socket is not None:
            return f"the CIPD proxy at {self.unix_socket}"
        return f"{base} (through the proxy {self.proxy.shown})" if self.proxy else base

    @property
    def forwards(self) -> bool:
        """Whether requests go to a forward proxy (absolute URLs, Proxy-Authorization)."""
        return self.proxy is not None and self.origin.scheme == "http"

    def target(self, path: str) -> str:
        """The request target: the path, or the absolute URL for a forward proxy."""
        if self.forwards:
            return f"http://{self.origin.authority}{path}"
        return path

    def proxy_fields(self) -> list[tuple[str, str]]:
        """Header fields only a forward proxy gets."""
        if self.forwards and self.proxy is not None and self.proxy.authorization:
            return [("Proxy-Authorization", self.proxy.authorization)]
        return []


class Connection:
    """One open connection along a route; used by one call at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = Reader(sock)

    def exchange(self, request: bytes, deadline: Deadline, limit: int) -> Response:
        """Send ``request`` and read the whole response (see ``wire.read_response``)."""
        send_all(self.sock, request, deadline)
        response = read_response(self.reader, deadline, limit)
        if self.reader.buffered or _peer_sent_more(self.sock):
            raise WireError(
                f"the answer is longer than announced ({len(response.body)} bytes of body, then more)"
            )
        return response

    def idle_and_clean(self) -> bool:
        """Whether an idle connection is still open with nothing unread (safe to reuse)."""
        if self.reader.buffered:
            return False
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        # Readable while idle: the peer closed it, or sent what nobody asked for.
        return not _readable_now(self.sock)

    def abort(self) -> None:
        """End a call blocked on this connection, from another thread (its owner closes it)."""
        with contextlib.suppress(OSError):  # already closed by the peer or by its owner
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def _peer_sent_more(sock: socket.socket) -> bool:
    """Whether bytes beyond the answer arrived with it (an over-long body)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        if not _readable_now(sock):
            return False
        sock.setblocking(False)
        try:
            return bool(sock.recv(1))  # b"": the peer closed after the answer, which is fine
        finally:
            sock.setblocking(True)
    except (BlockingIOError, ssl.SSLWantReadError):
        return False  # a TLS record not yet complete: nothing of the body, and the connection is dropped
    except OSError:
        return False


def _readable_now(sock: socket.socket) -> bool:
    """Whether reading ``sock`` would not block (data, end of stream or an error)."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def open_connection(
    route: Route, deadline: Deadline, context: ssl.SSLContext | None, user_agent: str
) -> Connection:
    """A connection along ``route``, ready for a request.

    Raises:
        DeadlineExpired: not connected in time.
        TunnelRefused: the proxy refused the tunnel.
        WireError: the proxy's answer broke HTTP.
        ssl.SSLError, OSError: the connection or the TLS handshake failed.
    """
    origin = route.origin
    if route.unix_socket is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(wait_bound(deadline))
            sock.connect(route.unix_socket)
        except TimeoutError:
            sock.close()
            raise DeadlineExpired from None
        except BaseException:
            sock.close()
            raise
        return Connection(sock)
    host, port = (route.proxy.host, route.proxy.port) if route.proxy else (origin.host, origin.port)
    sock = _connect_tcp(host, port, deadline)
    try:
        if route.proxy is not None and origin.scheme == "https":
            _open_tunnel(sock, route.proxy, origin, deadline, user_agent)
        if origin.scheme == "https":
            if context is None:
                raise ValueError("an https route needs a TLS context")
            sock = context.wrap_socket(sock, server_hostname=origin.host, do_handshake_on_connect=False)
            sock.settimeout(wait_bound(deadline))
            try:
                sock.do_handshake()
            except TimeoutError:
                raise DeadlineExpired from None
    except BaseException:
        sock.close()
        raise
    return Connection(sock)


def _connect_tcp(host: str, port: int, deadline: Deadline) -> socket.socket:
    # Not bounded by the deadline (see the module's docstring); checked right after.
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    failure: OSError | None = None
    for family, kind, protocol, _, address in addresses:
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(wait_bound(deadline))
            sock.connect(address)
        except TimeoutError:
            sock.close()
            raise DeadlineExpired from None
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise failure or OSError(f"no address for {host}")


def _open_tunnel(
    sock: socket.socket, proxy: Proxy, origin: Origin, deadline: Deadline, user_agent: str
) -> None:
    fields = [("Host", origin.address), ("User-Agent", user_agent)]
    if proxy.authorization:
        fields.append(("Proxy-Authorization", proxy.authorization))
    send_all(sock, format_request("CONNECT", origin.address, fields), deadline)
    reader = Reader(sock)
    answer = read_response(reader, deadline, 0, head_only=True)
    if answer.status != 200:
        raise TunnelRefused(
            f"the proxy {proxy.shown} refused the tunnel to {origin.address}: "
            f"HTTP {answer.status} {answer.reason}",
            transient=answer.status >= 500,
        )
    if reader.buffered:
        raise WireError(f"the proxy {proxy.shown} sent data before the tunnel was used")


def fetch(
    route: Route,
    method: str,
    path: str,
    *,
    fields: Sequence[tuple[str, str]],
    body: bytes,
    deadline: Deadline,
    limit: int,
    context: ssl.SSLContext | None = None,
    user_agent: str,
) -> Response:
    """One request on a connection of its own, closed before returning.

    For the token servers: rare requests, where keeping a connection buys nothing.
    """
    connection = open_connection(route, deadline, context, user_agent)
    try:
        request = format_request(method, route.target(path), [*fields, *route.proxy_fields()], body)
        return connection.exchange(request, deadline, limit)
    finally:
        connection.close()


class PoolClosed(Exception):
    """The pool was closed: no more connections."""


class ConnectionPool:
    """Keep-alive connections along one route, each used by one call at a time."""

    def __init__(self, opener: Callable[[Deadline], Connection], max_idle: int) -> None:
        self._opener = opener
        self._max_idle = max_idle
        # Guards the fields below; held only to move connections between them,
        # never while connecting, sending or reading.
        self._lock = threading.Lock()
        self._idle: list[Connection] = []  # open, unused, newest last
        self._busy: set[Connection] = set()  # lent to a call
        self._closed = False
        forks.track(self)

    def acquire(self, deadline: Deadline) -> tuple[Connection, bool]:
        """A connection, and whether it served earlier calls (it may have gone stale).

        Raises:
            PoolClosed: the pool is closed.
            and what ``open_connection`` raises.
        """
        stale: list[Connection] = []
        chosen: Connection | None = None
        with self._lock:
            if self._closed:
                raise PoolClosed
            while self._idle:
                candidate = self._idle.pop()
                if candidate.idle_and_clean():
                    chosen = candidate
                    self._busy.add(chosen)
                    break
                stale.append(candidate)
        for connection in stale:
            connection.close()
        if chosen is not None:
            return chosen, True
        return self.connect(deadline), False

    def connect(self, deadline: Deadline) -> Connection:
        """A new connection, lent to the caller."""
        connection = self._opener(deadline)
        with self._lock:
            if not self._closed:
                self._busy.add(connection)
                return connection
        connection.close()
        raise PoolClosed

    def release(self, connection: Connection, reusable: bool) -> None:
        """Take back a lent connection: kept for reuse if ``reusable`` and there is room."""
        with self._lock:
            if connection in self._busy:
                self._busy.discard(connection)
                if reusable and not self._closed and len(self._idle) < self._max_idle:
                    self._idle.append(connection)
                    return
        connection.close()

    def close(self) -> None:
        """Close idle connections and end the calls using the others. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for connection in idle:
            connection.close()
        for connection in busy:
            connection.abort()  # the call blocked on it fails now, and closes it

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without touching them."""
        self._lock = threading.Lock()
        inherited = [*self._idle, *self._busy]
        self._idle, self._busy = [], set()
        for connection in inherited:
            # close() only closes this process's copy of the descriptor: no
            # FIN or TLS alert reaches the peer while the parent holds its own.
            connection.close()
