"""``PrpcRepository``: instance metadata from the CIPD backend, over pRPC.

pRPC is the LUCI RPC protocol over HTTP/1.1: a ``POST`` to
``/prpc/<service>/<method>`` with the request message as the body, and the
gRPC status in the ``X-Prpc-Grpc-Code`` response header (the error text is
the body). This module speaks its binary encoding with the standard
library's ``http.client``, over TCP (TLS for https) or, through a CIPD
proxy, over a unix socket.

What the plugin sees, as under the Go client:

* a backend error keeps the backend's code and message (an ``AdmissionError``);
* an answer that is not pRPC becomes UNAVAILABLE (HTTP 503, or no connection)
  or INTERNAL (anything else), with a message saying what came back;
* transient failures (no connection, HTTP 5xx, 408 and 429 without a code,
  and the codes INTERNAL, UNKNOWN and UNAVAILABLE, which luci-go's grpcutil
  treats as transient) are retried with exponential backoff and jitter until
  the call's timeout; the last failure is then reported as it was. Other
  codes are final at once.

Credentials go only to https backends, never to http (local development
backends) nor through a proxy, which holds its own.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import math
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Sequence

import grpc
from google.protobuf.message import DecodeError

from cipdplugin.deadline import Deadline
from cipdplugin.errors import AdmissionError
from cipdplugin.options import ClientOptions, normalise_service_url, proxy_socket_path
from cipdplugin.protocol.cipd_pb2 import ListMetadataRequest, ListMetadataResponse
from cipdplugin.status import known_code

log = logging.getLogger(__name__)

#: Default limit, in seconds, for one ``list_metadata`` call, retries included.
DEFAULT_TIMEOUT = 30.0
#: First retry delay, in seconds; it doubles per retry up to ``MAX_BACKOFF``.
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 10.0
#: Idle keep-alive connections kept per repository.
MAX_IDLE_CONNECTIONS = 8
#: Larger answers are refused (the Go pRPC client's limit).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: Error messages from the body are cut to this many bytes, as the Go client does.
ERROR_BODY_LIMIT = 256
#: A token is refreshed this many seconds before it expires.
TOKEN_REFRESH_MARGIN = 60.0
#: How long a token given without an expiry is used, in seconds.
PLAIN_TOKEN_LIFETIME = 300.0

#: A retry is only worth it with this much time left, in seconds.
_MIN_ATTEMPT = 0.05

LIST_METADATA_PATH = "/prpc/cipd.Repository/ListMetadata"
PRPC_BINARY = "application/prpc; encoding=binary"
CODE_HEADER = "X-Prpc-Grpc-Code"
TIMEOUT_HEADER = "X-Prpc-Grpc-Timeout"

#: Returns an OAuth2 access token, alone or with its expiry (a UNIX timestamp).
TokenSource = Callable[[], str | tuple[str, float]]

_TRANSIENT_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE})
_BINARY_TYPES = frozenset({"application/prpc", "application/protobuf", "application/x-protobuf"})
# pRPC timeout units, finest first: a value has at most 8 digits.
_TIMEOUT_UNITS = ((1, "n"), (10**3, "u"), (10**6, "m"), (10**9, "S"), (60 * 10**9, "M"), (3600 * 10**9, "H"))


class _Failure(Exception):
    """One failed attempt: the status to report, and whether to try again."""

    def __init__(self, code: grpc.StatusCode, message: str, *, transient: bool) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.transient = transient


def encode_timeout(seconds: float) -> str:
    """A ``X-Prpc-Grpc-Timeout`` value: the finest unit that fits 8 digits, rounded up."""
    nanoseconds = max(math.ceil(seconds * 1e9), 1)
    for unit, suffix in _TIMEOUT_UNITS:
        count = -(-nanoseconds // unit)  # rounded up, in whole integers
        if count <= 99_999_999 or suffix == "H":
            return f"{count}{suffix}"
    raise AssertionError("unreachable: hours always fit")


class _UnixConnection(http.client.HTTPConnection):
    """Plain HTTP over a unix socket; the ``Host`` header still names the backend."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _ConnectionPool:
    """Idle keep-alive connections to one target, handed to one call at a time."""

    def __init__(self, factory: Callable[[], http.client.HTTPConnection], max_idle: int) -> None:
        self._factory = factory
        self._max_idle = max_idle
        # Guards the fields below; held only to move connections in and out.
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []  # connected, unused, newest last
        self._closed = False

    def acquire(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection, and whether it was used before (it may have gone stale)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._factory(), False

    def connect(self) -> http.client.HTTPConnection:
        """A new connection (not yet connected: that happens on its first request)."""
        return self._factory()

    def release(self, connection: http.client.HTTPConnection) -> None:
        """Keep ``connection`` for reuse if it is still open and there is room."""
        with self._lock:
            if connection.sock is not None and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class _TokenCache:
    """A token source's last token, until shortly before it expires."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source
        # Guards the fields below. Held while the source runs, so concurrent
        # calls wait for one refresh instead of each starting one; the source
        # bounds that wait (LuciAuthTokenSource has a timeout).
        self._lock = threading.Lock()
        self._token = ""
        self._valid_until = 0.0  # time.monotonic() after which to refresh

    def get(self) -> str:
        """A current token.

        Raises:
            AdmissionError: UNAUTHENTICATED if the source fails or returns
                something else than a token; the source's own AdmissionError
                passes through.
        """
        with self._lock:
            if self._token and time.monotonic() < self._valid_until:
                return self._token
            try:
                answer = self._source()
            except AdmissionError:
                raise
            except Exception as exc:
                raise AdmissionError(
                    f"cannot get an access token: {exc}", code=grpc.StatusCode.UNAUTHENTICATED
                ) from exc
            token, lifetime = _token_and_lifetime(answer)
            # A token about to expire is still used for this call, not kept.
            self._token = token if lifetime > TOKEN_REFRESH_MARGIN else ""
            self._valid_until = time.monotonic() + lifetime - TOKEN_REFRESH_MARGIN
            return token

    def invalidate(self) -> None:
        with self._lock:
            self._token = ""


def _token_and_lifetime(answer: object) -> tuple[str, float]:
    expiry: object = None
    token = answer
    if isinstance(answer, tuple) and len(answer) == 2:
        token, expiry = answer
    if not isinstance(token, str) or not token:
        raise AdmissionError(
            f"the token source returned {type(answer).__name__}, not a token or a (token, expiry) pair",
            code=grpc.StatusCode.UNAUTHENTICATED,
        )
    if expiry is None:
        return token, PLAIN_TOKEN_LIFETIME
    if not isinstance(expiry, (int, float)) or isinstance(expiry, bool):
        raise AdmissionError(
            f"the token's expiry must be a UNIX timestamp, got {expiry!r}",
            code=grpc.StatusCode.UNAUTHENTICATED,
        )
    return token, float(expiry) - time.time()


class LuciAuthTokenSource:
    """OAuth2 access tokens from ``luci-auth token``, the LUCI login tool.

    Log in once with ``luci-auth login``; each call then runs
    ``luci-auth token -json-output - -lifetime <lifetime>`` and returns the
    ``(token, expiry)`` pair it prints (``PrpcRepository`` caches it).

    Raises (when called):
        AdmissionError: UNAUTHENTICATED, saying what to do: luci-auth is not
            installed, not logged in, failed, or printed something unexpected.
    """

    def __init__(
        self,
        executable: str = "luci-auth",
        *,
        scopes: Sequence[str] = (),
        lifetime: float = 2 * TOKEN_REFRESH_MARGIN,
        timeout: float = 60.0,
    ) -> None:
        self.executable = executable
        self.scopes = tuple(scopes)
        self.lifetime = lifetime
        self.timeout = timeout

    def command(self) -> list[str]:
        """The command line run for each token (with the executable found on PATH)."""
        path = shutil.which(self.executable)
        if path is None:
            raise AdmissionError(
                f"{self.executable!r} was not found: install luci-auth (it comes with depot_tools) "
                "and run 'luci-auth login', or use the backend without credentials",
                code=grpc.StatusCode.UNAUTHENTICATED,
            )
        argv = [path, "token", "-json-output", "-", "-lifetime", f"{int(self.lifetime)}s"]
        if self.scopes:
            argv += ["-scopes", " ".join(self.scopes)]
        return argv

    def __call__(self) -> tuple[str, float]:
        argv = self.command()
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise AdmissionError(
                f"'luci-auth token' gave no token within {self.timeout:g} s",
                code=grpc.StatusCode.UNAUTHENTICATED,
            ) from None
        except OSError as exc:
            raise AdmissionError(
                f"cannot run {argv[0]!r}: {exc}", code=grpc.StatusCode.UNAUTHENTICATED
            ) from None
        if done.returncode != 0:
            said = done.stderr.strip().splitlines()
            raise AdmissionError(
                f"'luci-auth token' failed (exit status {done.returncode})"
                + (f": {said[-1]}" if said else "")
                + "; run 'luci-auth login' to log in",
                code=grpc.StatusCode.UNAUTHENTICATED,
            )
        try:
            data = json.loads(done.stdout)
            token, expiry = data["token"], data["expiry"]
        except (ValueError, TypeError, KeyError):
            raise AdmissionError(
                f"'luci-auth token' printed {done.stdout[:80]!r}, not a JSON token with an expiry",
                code=grpc.StatusCode.UNAUTHENTICATED,
            ) from None
        if not isinstance(token, str) or not token or not isinstance(expiry, (int, float)):
            raise AdmissionError(
                "'luci-auth token' printed an empty token", code=grpc.StatusCode.UNAUTHENTICATED
            )
        return token, float(expiry)


class PrpcRepository:
    """A ``RepositoryClient`` asking the CIPD backend (``cipd.Repository/ListMetadata``).

    Thread-safe: the host's server threads call ``list_metadata``
    concurrently. Keep-alive connections are reused (up to
    ``MAX_IDLE_CONNECTIONS`` idle ones); ``close()`` (or leaving a ``with``
    block) closes them. Nothing connects before the first call.

    Args:
        service_url: the backend, ``http(s)://host[:port]``.
        token_source: OAuth2 tokens for https backends (see ``TokenSource``);
            ignored for http backends and through a proxy.
        proxy_url: ``unix:///path``: send every call through the CIPD proxy
            listening on that socket, without credentials.
        timeout: seconds one ``list_metadata`` call may take, retries included.
        initial_backoff, max_backoff: retry delays in seconds (each delay is
            drawn between half and all of ``initial_backoff * 2**retry``,
            capped at ``max_backoff``).

    Raises:
        ConfigError: ``service_url`` or ``proxy_url`` is malformed.
        ValueError: ``timeout`` is not a positive number of seconds.
    """

    def __init__(
        self,
        service_url: str,
        *,
        token_source: TokenSource | None = None,
        proxy_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        from cipdplugin import __version__  # here: the package imports this module

        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.service_url = normalise_service_url(service_url, "service_url")
        self.proxy_url = proxy_url
        self.timeout = timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        parts = urllib.parse.urlsplit(self.service_url)
        self._host = parts.netloc
        self._user_agent = f"cipdplugin/{__version__} python/{sys.version_info[0]}.{sys.version_info[1]}"
        # Closing wakes a retry delay so that the call ends at once.
        self._closed = threading.Event()
        factory: Callable[[], http.client.HTTPConnection]
        if proxy_url is not None:
            socket_path = proxy_socket_path(proxy_url, "proxy_url")
            self._target = f"the CIPD proxy at {socket_path}"
            factory = lambda: _UnixConnection(socket_path, timeout)  # noqa: E731
        elif parts.scheme == "https":
            context = ssl.create_default_context()  # the system trust store, SSL_CERT_FILE/DIR
            self._target = self.service_url
            factory = lambda: http.client.HTTPSConnection(self._host, timeout=timeout, context=context)  # noqa: E731
        else:
            self._target = self.service_url
            factory = lambda: http.client.HTTPConnection(self._host, timeout=timeout)  # noqa: E731
        self._pool = _ConnectionPool(factory, MAX_IDLE_CONNECTIONS)
        sends_credentials = token_source is not None and proxy_url is None and parts.scheme == "https"
        self._tokens = _TokenCache(token_source) if sends_credentials and token_source else None

    @classmethod
    def from_options(
        cls,
        options: ClientOptions,
        *,
        token_source: TokenSource | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> PrpcRepository:
        """A repository for the backend (and proxy) of ``options``."""
        return cls(
            options.service_url, token_source=token_source, proxy_url=options.proxy_url, timeout=timeout
        )

    @property
    def sends_credentials(self) -> bool:
        """Whether calls carry a token (https, no proxy, a token source)."""
        return self._tokens is not None

    def __repr__(self) -> str:
        via = f", proxy_url={self.proxy_url!r}" if self.proxy_url else ""
        return f"PrpcRepository({self.service_url!r}{via})"

    def __enter__(self) -> PrpcRepository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close idle connections; calls in flight end (CANCELLED if retrying). Idempotent."""
        self._closed.set()
        self._pool.close()

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        """One page of an instance's metadata, as the backend answers it.

        Blocks for at most ``timeout`` seconds (plus the token source's time).

        Raises:
            AdmissionError: the backend's code and message, or a code and
                message describing what went wrong on the way.
        """
        deadline = Deadline(self.timeout)
        body = request.SerializeToString()
        retry = 0
        while True:
            try:
                return self._attempt(body, deadline)
            except _Failure as failure:
                if failure.code == grpc.StatusCode.UNAUTHENTICATED and self._tokens is not None:
                    self._tokens.invalidate()
                delay = self._backoff(retry)
                # No retry that could not get an answer in time: the failure
                # in hand says more than a DEADLINE_EXCEEDED would.
                if not failure.transient or delay + _MIN_ATTEMPT >= _seconds_left(deadline):
                    raise AdmissionError(failure.message, code=failure.code) from None
                retry += 1
                log.info(
                    "ListMetadata failed (%s: %s); retry %d in %.2f s",
                    failure.code.name,
                    failure.message,
                    retry,
                    delay,
                )
                if self._closed.wait(delay):
                    raise AdmissionError(
                        "the repository was closed", code=grpc.StatusCode.CANCELLED
                    ) from None

    def _backoff(self, retry: int) -> float:
        ceiling = min(self._max_backoff, self._initial_backoff * 2**retry)
        return random.uniform(ceiling / 2, ceiling)

    def _headers(self, deadline: Deadline) -> dict[str, str]:
        headers = {
            "Host": self._host,
            "Content-Type": PRPC_BINARY,
            "Accept": PRPC_BINARY,
            "User-Agent": self._user_agent,
            TIMEOUT_HEADER: encode_timeout(_seconds_left(deadline)),
        }
        if self._tokens is not None:
            headers["Authorization"] = f"Bearer {self._tokens.get()}"
        return headers

    def _attempt(self, body: bytes, deadline: Deadline) -> ListMetadataResponse:
        if self._closed.is_set():
            raise _Failure(grpc.StatusCode.CANCELLED, "the repository was closed", transient=False)
        headers = self._headers(deadline)
        connection, reused = self._pool.acquire()
        try:
            try:
                status, response_headers, payload = self._exchange(connection, body, headers, deadline)
            except (ConnectionError, http.client.BadStatusLine) as exc:
                if not reused:
                    raise
                # The backend closed the idle connection we reused: a fresh one
                # tells a stale connection apart from a backend that is down.
                log.debug("reused connection failed (%r); reconnecting", exc)
                connection.close()
                connection = self._pool.connect()
                status, response_headers, payload = self._exchange(connection, body, headers, deadline)
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            raise _Failure(
                grpc.StatusCode.UNAVAILABLE,
                f"the TLS certificate of {self._host} is not trusted ({exc.verify_message}); "
                "the system trust store is used, see SSL_CERT_FILE and SSL_CERT_DIR",
                transient=False,
            ) from None
        except TimeoutError:
            connection.close()
            raise _Failure(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer from {self._target} within the {self.timeout:g} s timeout",
                transient=False,
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _Failure(
                grpc.StatusCode.UNAVAILABLE, f"cannot reach {self._target}: {_describe(exc)}", transient=True
            ) from None
        except _Failure:
            connection.close()
            raise
        self._pool.release(connection)
        return self._decode(status, response_headers, payload)

    def _exchange(
        self, connection: http.client.HTTPConnection, body: bytes, headers: dict[str, str], deadline: Deadline
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        remaining = _seconds_left(deadline)
        if remaining <= 0:
            raise TimeoutError
        connection.timeout = remaining
        if connection.sock is not None:
            connection.sock.settimeout(remaining)
        connection.request("POST", LIST_METADATA_PATH, body=body, headers=headers)
        response = connection.getresponse()
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise _Failure(
                grpc.StatusCode.UNAVAILABLE,
                f"the backend's answer is too big ({declared} bytes)",
                transient=False,
            )
        payload = response.read(MAX_RESPONSE_BYTES + 1)
        if len(payload) > MAX_RESPONSE_BYTES:
            raise _Failure(
                grpc.StatusCode.UNAVAILABLE,
                f"the backend's answer is too big (more than {MAX_RESPONSE_BYTES} bytes)",
                transient=False,
            )
        if response.getheader("Content-Encoding", "").strip().lower() == "gzip":
            try:
                payload = gzip.decompress(payload)
            except (OSError, EOFError, zlib.error) as exc:
                raise _Failure(
                    grpc.StatusCode.INTERNAL,
                    f"the backend's gzip answer does not decompress: {exc}",
                    transient=False,
                ) from None
        return response.status, response.headers, payload

    def _decode(self, status: int, headers: http.client.HTTPMessage, payload: bytes) -> ListMetadataResponse:
        code_text = headers.get(CODE_HEADER)
        if code_text is None:
            raise self._not_prpc(status, headers, payload)
        try:
            code = known_code(int(code_text.strip()))
        except ValueError:
            raise _Failure(
                grpc.StatusCode.INTERNAL,
                f"the backend answered an invalid {CODE_HEADER} header {code_text!r} (HTTP {status})",
                transient=False,
            ) from None
        if code is None:
            raise _Failure(
                grpc.StatusCode.UNKNOWN,
                f"the backend answered unknown gRPC code {code_text.strip()}: {_error_text(payload)}",
                transient=False,
            )
        if code != grpc.StatusCode.OK:
            message = _error_text(payload)
            raise _Failure(code, message.removesuffix("\n"), transient=code in _TRANSIENT_CODES)
        content_type = headers.get("Content-Type", "")
        media_type, _, parameters = content_type.partition(";")
        encoding = parameters.strip().lower().removeprefix("encoding=").strip() if parameters else ""
        if content_type and (
            media_type.strip().lower() not in _BINARY_TYPES or encoding not in ("", "binary")
        ):
            raise _Failure(
                grpc.StatusCode.INTERNAL,
                f"the backend answered OK with content type {content_type!r}, not {PRPC_BINARY!r}",
                transient=False,
            )
        answer = ListMetadataResponse()
        try:
            answer.ParseFromString(payload)
        except DecodeError:
            preview = payload[:32].hex(" ") + (" ..." if len(payload) > 32 else "")
            raise _Failure(
                grpc.StatusCode.INTERNAL,
                f"the backend's answer ({len(payload)} bytes: {preview}) "
                "does not decode as a cipd.ListMetadataResponse",
                transient=False,
            ) from None
        return answer

    def _not_prpc(self, status: int, headers: http.client.HTTPMessage, payload: bytes) -> _Failure:
        kind = headers.get("Content-Type") or "no content type"
        what = f"HTTP {status} without a {CODE_HEADER} header ({kind}): {_error_text(payload)!r}"
        if status >= 500:
            code = grpc.StatusCode.UNAVAILABLE if status == 503 else grpc.StatusCode.INTERNAL
            return _Failure(code, f"{self._target} is not answering pRPC: {what}", transient=True)
        transient = status in (408, 429)
        return _Failure(
            grpc.StatusCode.INTERNAL, f"{self._target} is not a pRPC server: {what}", transient=transient
        )


def _error_text(payload: bytes) -> str:
    """The body as an error message, cut as the Go pRPC client cuts it."""
    if len(payload) > ERROR_BODY_LIMIT:
        return payload[:ERROR_BODY_LIMIT].decode("utf-8", errors="ignore") + "..."
    return payload.decode("utf-8", errors="replace")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _seconds_left(deadline: Deadline) -> float:
    """What is left of a call's deadline; calls always have one (``timeout`` is positive)."""
    left = deadline.remaining()
    return 0.0 if left is None else left
