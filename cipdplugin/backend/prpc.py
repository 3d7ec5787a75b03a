"""``PrpcRepository``: instance metadata from the CIPD backend, over pRPC.

pRPC is the LUCI RPC protocol over HTTP/1.1 (luci-go ``grpc/prpc``): a
``POST`` to ``/prpc/<service>/<method>`` with the request message as the
body, and the gRPC status in the ``X-Prpc-Grpc-Code`` response header (the
error text is the body). This module speaks its binary encoding over
``wire.py`` and ``connection.py``, and reads answers with ``answers.py``.
Each RPC is one small method over ``_call(method, request, response_type)``:
``list_metadata`` is three lines.

What the plugin sees, as under the Go client:

* a backend error keeps the backend's code and message (an ``AdmissionError``);
* an answer that is not pRPC becomes UNAVAILABLE (HTTP 503, or no connection)
  or INTERNAL (anything else), with a message saying what came back;
* transient failures (no connection, a short, over-long or malformed answer,
  HTTP 5xx, 408 and 429 without a code, and the codes INTERNAL, UNKNOWN and
  UNAVAILABLE, which luci-go's grpcutil treats as transient) are retried
  with exponential backoff and jitter within the call's deadline; the last
  failure is then reported as it was. Other codes are final at once.

One deadline bounds a whole call: the token, connecting (a proxy tunnel and
TLS included), sending, every byte of the answer, and the retries. When it
passes, the call ends with DEADLINE_EXCEEDED naming the backend and the time.

Credentials go only to https backends, never to http ones (local
development backends) nor through the CIPD proxy, which holds its own; an
HTTP proxy on the way (``HTTPS_PROXY``) only sees an encrypted tunnel.
"""

from __future__ import annotations

import logging
import math
import os
import random
import ssl
import threading
from collections.abc import Mapping
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from cipdplugin.backend.answers import (
    CODE_HEADER,
    PRPC_BINARY,
    TIMEOUT_HEADER,
    CallFailure,
    decode_answer,
    encode_timeout,
    user_agent,
)
from cipdplugin.backend.connection import (
    ConnectionPool,
    PoolClosed,
    Route,
    TunnelRefused,
    open_connection,
)
from cipdplugin.backend.hosts import parse_origin
from cipdplugin.backend.proxies import ProxyRules
from cipdplugin.backend.tokens import TokenCache, TokenSource
from cipdplugin.backend.wire import (
    ClosedBeforeAnswer,
    DeadlineExpired,
    Response,
    TooBig,
    WireError,
    format_request,
    time_left,
)
from cipdplugin.constants import (
    BACKEND_INITIAL_BACKOFF,
    BACKEND_MAX_BACKOFF,
    BACKEND_MIN_ATTEMPT,
    BACKEND_TIMEOUT,
    MAX_IDLE_CONNECTIONS,
    MAX_RESPONSE_BYTES,
)
from cipdplugin.deadline import Deadline, checked_timeout
from cipdplugin.errors import AdmissionError
from cipdplugin.options import (
    PROXY_URL_ENV,
    ClientOptions,
    ConfigError,
    normalise_service_url,
    proxy_socket_path,
)
from cipdplugin.protocol.cipd_pb2 import ListMetadataRequest, ListMetadataResponse

log = logging.getLogger("cipdplugin.backend")

#: Default limit, in seconds, for one call, retries and the token included.
DEFAULT_TIMEOUT = BACKEND_TIMEOUT

LIST_METADATA = "cipd.Repository/ListMetadata"

AnswerT = TypeVar("AnswerT", bound=Message)


class PrpcRepository:
    """A ``RepositoryClient`` asking the CIPD backend (``cipd.Repository/ListMetadata``).

    Thread-safe: the host's server pool calls ``list_metadata``
    concurrently. Keep-alive connections are reused (up to
    ``MAX_IDLE_CONNECTIONS`` idle ones), never across ``fork()``; ``close()``
    (or leaving a ``with`` block) closes them and ends calls in flight.
    Nothing connects before the first call.

    Args:
        service_url: the backend, ``http(s)://host[:port]``.
        token_source: OAuth2 tokens for https backends (see ``TokenSource``
            and ``default_token_source``); ignored for http backends and
            through the CIPD proxy.
        proxy_url: ``unix:///path``: send every call through the CIPD proxy
            listening on that socket, without credentials. None: the
            environment's ``CIPD_PROXY_URL``, if set.
        timeout: seconds one call may take, retries and the token included.
        initial_backoff, max_backoff: retry delays in seconds (each delay is
            drawn between half and all of ``initial_backoff * 2**retry``,
            capped at ``max_backoff``).
        environ: the environment to read as the Go client does
            (``CIPD_PROXY_URL``, ``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``,
            ``CIPD_HTTP_USER_AGENT_PREFIX``); None means ``os.environ``.

    Raises:
        ConfigError: ``service_url``, ``proxy_url`` or an environment variable is malformed.
        ValueError, TypeError: a time is not a finite, positive number of seconds.
    """

    def __init__(
        self,
        service_url: str,
        *,
        token_source: TokenSource | None = None,
        proxy_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        initial_backoff: float = BACKEND_INITIAL_BACKOFF,
        max_backoff: float = BACKEND_MAX_BACKOFF,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.timeout = checked_timeout(timeout, "timeout")
        self._initial_backoff = checked_timeout(initial_backoff, "initial_backoff")
        self._max_backoff = checked_timeout(max_backoff, "max_backoff")
        self.service_url = normalise_service_url(service_url, "service_url")
        try:
            origin = parse_origin(self.service_url)
        except ValueError as exc:
            raise ConfigError(f"bad service_url={service_url!r}: {exc}") from None
        source_of_proxy = "proxy_url"
        if proxy_url is None and env.get(PROXY_URL_ENV):
            proxy_url, source_of_proxy = env[PROXY_URL_ENV], PROXY_URL_ENV
        self.proxy_url = proxy_url
        self._user_agent = user_agent(env)
        if proxy_url is not None:
            # The CIPD proxy wins over HTTP proxies, as in the Go client.
            self._route = Route(origin, unix_socket=proxy_socket_path(proxy_url, source_of_proxy))
        else:
            rules = ProxyRules.from_environ(env)
            self._route = Route(origin, proxy=rules.proxy_for(origin.scheme, origin.host, origin.port))
        # The system trust store, SSL_CERT_FILE/DIR, read once.
        self._context = (
            ssl.create_default_context() if origin.scheme == "https" and proxy_url is None else None
        )
        route, context, agent = self._route, self._context, self._user_agent
        self._pool = ConnectionPool(
            lambda deadline: open_connection(route, deadline, context, agent), MAX_IDLE_CONNECTIONS
        )
        sends_credentials = token_source is not None and proxy_url is None and origin.scheme == "https"
        self._tokens = TokenCache(token_source) if sends_credentials and token_source else None
        # Set by close(): wakes a retry delay so that the call ends at once.
        self._closed = threading.Event()

    @classmethod
    def from_options(
        cls,
        options: ClientOptions,
        *,
        token_source: TokenSource | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Mapping[str, str] | None = None,
    ) -> PrpcRepository:
        """A repository for the backend (and CIPD proxy) of ``options``.

        The options decide the CIPD proxy; ``environ`` the HTTP proxies and the user agent.
        """
        env = dict(os.environ if environ is None else environ)
        env.pop(PROXY_URL_ENV, None)  # already read into the options (or deliberately absent)
        return cls(
            options.service_url,
            token_source=token_source,
            proxy_url=options.proxy_url,
            timeout=timeout,
            environ=env,
        )

    @property
    def sends_credentials(self) -> bool:
        """Whether calls carry a token (https, no CIPD proxy, a token source)."""
        return self._tokens is not None

    @property
    def target(self) -> str:
        """Where calls go, for messages: the backend, and the proxy in between if any."""
        return self._route.shown

    @property
    def user_agent(self) -> str:
        return self._user_agent

    def __repr__(self) -> str:
        via = f", proxy_url={self.proxy_url!r}" if self.proxy_url else ""
        return f"PrpcRepository({self.service_url!r}{via})"

    def __enter__(self) -> PrpcRepository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close connections; calls in flight end at once (CANCELLED). Idempotent."""
        self._closed.set()
        self._pool.close()

    # -- RPCs ----------------------------------------------------------------------

    def list_metadata(
        self, request: ListMetadataRequest, *, timeout: float | None = None
    ) -> ListMetadataResponse:
        """One page of an instance's metadata, as the backend answers it.

        Blocks for at most ``timeout`` seconds, or the repository's own
        ``timeout`` if that is shorter (or ``timeout`` is None): a host passes
        what is left of the plugin's call, so the backend's failure reaches
        the plugin before the plugin's own deadline does.

        Raises:
            AdmissionError: the backend's code and message, or a code and
                message describing what went wrong on the way
                (DEADLINE_EXCEEDED: "no answer from <backend> within N s").
            ValueError, TypeError: ``timeout`` is not a number of seconds.
        """
        return self._call(LIST_METADATA, request, ListMetadataResponse, timeout=timeout)

    # -- One call ------------------------------------------------------------------

    def _call(
        self, method: str, request: Message, response_type: type[AnswerT], *, timeout: float | None = None
    ) -> AnswerT:
        """Call ``method`` (``"package.Service/Method"``) and decode its answer as ``response_type``."""
        seconds = self._call_timeout(timeout)
        deadline = Deadline(seconds)
        body = request.SerializeToString()
        log.info("%s: waiting on %s (up to %s s)", method, self._route.shown, _seconds(seconds))
        retry = 0
        while True:
            try:
                return decode_answer(
                    self._attempt(method, body, deadline, seconds), response_type, self._route.shown
                )
            except CallFailure as failure:
                if failure.code == grpc.StatusCode.CANCELLED and self._closed.is_set():
                    raise AdmissionError(failure.message, code=failure.code) from None
                delay = self._backoff(retry)
                # No retry that could not get an answer in time: the failure
                # in hand says more than a DEADLINE_EXCEEDED would.
                final = not failure.transient or delay + BACKEND_MIN_ATTEMPT >= time_left(deadline)
                what = f"{failure.code.name}: {failure.message}"
                then = "" if final else f"; retry {retry + 1} in {delay:.2f} s"
                if retry == 0:
                    log.warning("%s to %s failed (%s)%s", method, self._route.shown, what, then)
                else:
                    log.debug("%s to %s failed again (%s)%s", method, self._route.shown, what, then)
                if final:
                    raise AdmissionError(failure.message, code=failure.code) from None
                retry += 1
                if self._closed.wait(delay):
                    raise AdmissionError(
                        "the repository was closed", code=grpc.StatusCode.CANCELLED
                    ) from None

    def _call_timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
        if math.isnan(timeout):
            raise ValueError("timeout must be a number of seconds, got nan")
        return min(self.timeout, max(0.0, float(timeout)))

    def _backoff(self, retry: int) -> float:
        ceiling = min(self._max_backoff, self._initial_backoff * 2 ** min(retry, 64))
        return random.uniform(ceiling / 2, ceiling)

    def _attempt(self, method: str, body: bytes, deadline: Deadline, seconds: float) -> Response:
        if self._closed.is_set():
            raise CallFailure(grpc.StatusCode.CANCELLED, "the repository was closed", transient=False)
        fields, token = self._fields(deadline, seconds)
        request = format_request("POST", self._route.target(f"/prpc/{method}"), fields, body)
        try:
            response = self._round_trip(request, deadline)
        except Exception as exc:
            raise self._transport_failure(exc, seconds) from None
        code_text = response.headers.get(CODE_HEADER) or ""
        if token and self._tokens and code_text.strip() == str(grpc.StatusCode.UNAUTHENTICATED.value[0]):
            self._tokens.invalidate(token)
        return response

    def _fields(self, deadline: Deadline, seconds: float) -> tuple[list[tuple[str, str]], str]:
        """The request's header fields (the token fetched if needed), and the token."""
        token = ""
        if self._tokens is not None:
            try:
                token = self._tokens.get(deadline, seconds)
            except AdmissionError as exc:
                raise CallFailure(exc.code, exc.message, transient=False) from None
        fields = [
            ("Host", self._route.origin.authority),
            ("Content-Type", PRPC_BINARY),
            ("Accept", PRPC_BINARY),
            ("Accept-Encoding", "gzip"),
            ("User-Agent", self._user_agent),
            (TIMEOUT_HEADER, encode_timeout(max(time_left(deadline), 1e-9))),
            *self._route.proxy_fields(),
        ]
        if token:
            fields.append(("Authorization", f"Bearer {token}"))
        return fields, token

    def _round_trip(self, request: bytes, deadline: Deadline) -> Response:
        """Send ``request`` on a pooled connection and read the answer; the connection goes back."""
        connection, reused = self._pool.acquire(deadline)
        try:
            response = connection.exchange(request, deadline, MAX_RESPONSE_BYTES)
        except (OSError, ClosedBeforeAnswer) as exc:
            self._pool.release(connection, reusable=False)
            if not reused:
                raise
            # The backend closed the idle connection we reused just now: a
            # fresh one tells a stale connection apart from a backend that is down.
            log.debug(
                "a reused connection to %s failed (%s); reconnecting", self._route.shown, type(exc).__name__
            )
            connection = self._pool.connect(deadline)
            try:
                response = connection.exchange(request, deadline, MAX_RESPONSE_BYTES)
            except BaseException:
                self._pool.release(connection, reusable=False)
                raise
        except BaseException:
            self._pool.release(connection, reusable=False)
            raise
        self._pool.release(connection, response.reusable)
        return response

    def _transport_failure(self, exc: Exception, seconds: float) -> CallFailure:
        """What a failure on the way means for the call (messages never hold a header we sent)."""
        shown = self._route.shown
        if isinstance(exc, DeadlineExpired):
            return CallFailure(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer from {shown} within {_seconds(seconds)} s",
                transient=False,
            )
        if isinstance(exc, PoolClosed) or self._closed.is_set():
            # close() shut the connection down under the call: whatever broke, that is why.
            return CallFailure(grpc.StatusCode.CANCELLED, "the repository was closed", transient=False)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return CallFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"the TLS certificate of {self._route.origin.authority} is not trusted "
                f"({exc.verify_message}); the system trust store is used, see SSL_CERT_FILE and SSL_CERT_DIR",
                transient=False,
            )
        if isinstance(exc, TooBig):
            return CallFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"the answer of {shown} is too big ({exc.detail})",
                transient=False,
            )
        if isinstance(exc, TunnelRefused):
            return CallFailure(grpc.StatusCode.UNAVAILABLE, exc.message, transient=exc.transient)
        if isinstance(exc, WireError):
            return CallFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"bad answer from {shown}: {exc.message}",
                transient=exc.transient,
            )
        if isinstance(exc, OSError):
            return CallFailure(
                grpc.StatusCode.UNAVAILABLE, f"cannot reach {shown}: {_describe(exc)}", transient=True
            )
        raise exc


def _describe(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _seconds(seconds: float) -> str:
    """A time for messages: whole seconds from 10 on, two significant digits below."""
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.2g}"
