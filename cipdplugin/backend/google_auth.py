"""``GoogleAuthTokenSource``: any google-auth credentials, such as a service-account JSON key.

Needs the optional extra: ``pip install 'cipdplugin[google-auth]'``. The
base install never imports google-auth.

google-auth signs and parses; the HTTP requests it makes (a key's token
request to ``oauth2.googleapis.com``) go through this package's own client,
so they keep the call's deadline and use the machine's proxies as the Go
client's token requests do (Go's default transport, ``ProxyFromEnvironment``).
A refresh google-auth retries after a server error may sleep its own backoff
(about a second) past the deadline before its next request is refused.
"""

from __future__ import annotations

import datetime
import functools
import os
import ssl
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cipdplugin import __version__
from cipdplugin.backend.connection import Route, fetch
from cipdplugin.backend.hosts import parse_origin
from cipdplugin.backend.proxies import ProxyRules
from cipdplugin.backend.tokens import EMAIL_SCOPE, BoundedTokenSource, TokenError, deadline_passed
from cipdplugin.backend.wire import DeadlineExpired, WireError, gunzip, time_left
from cipdplugin.constants import MAX_TOKEN_RESPONSE_BYTES
from cipdplugin.deadline import Deadline
from cipdplugin.options import ConfigError

if TYPE_CHECKING:
    import google.auth.credentials

EXTRA_HINT = "install it with: pip install 'cipdplugin[google-auth]'"


def _google_auth() -> Any:
    """The google-auth modules this adapter uses.

    Raises:
        ConfigError: google-auth is not installed.
    """
    try:
        import google.auth.exceptions
        import google.auth.transport
        import google.oauth2.service_account
    except ImportError:
        raise ConfigError(f"service-account keys need the google-auth package; {EXTRA_HINT}") from None
    return google


class GoogleAuthTokenSource(BoundedTokenSource):
    """Tokens from google-auth credentials, refreshed when the cache asks.

    Args:
        credentials: ``google.auth.credentials.Credentials`` (for example
            ``google.oauth2.service_account.Credentials``), with their scopes.
        environ: the environment whose proxies the token requests use; None means ``os.environ``.
        description: how messages and ``-v`` name the credentials.

    Raises:
        ConfigError: google-auth is not installed, or a proxy variable is invalid.

    Raises (when fetching):
        AdmissionError: UNAUTHENTICATED with google-auth's reason, or
            DEADLINE_EXCEEDED when no token came in time.
    """

    def __init__(
        self,
        credentials: google.auth.credentials.Credentials,
        *,
        environ: Mapping[str, str] | None = None,
        description: str = "google-auth credentials",
    ) -> None:
        self._google = _google_auth()
        self.credentials = credentials
        self._description = description
        self._proxies = ProxyRules.from_environ(os.environ if environ is None else environ)
        self._context = ssl.create_default_context()
        # Guards ``credentials`` while they refresh: one source may serve several repositories.
        self._lock = threading.Lock()

    @classmethod
    def from_service_account_file(
        cls, path: str, *, scopes: Sequence[str] = (EMAIL_SCOPE,), environ: Mapping[str, str] | None = None
    ) -> GoogleAuthTokenSource:
        """The service account of a JSON key file (``-service-account-json PATH``).

        Raises:
            ConfigError: google-auth is missing, or the file is not a readable service-account key.
        """
        try:
            google = _google_auth()
        except ConfigError as exc:
            raise ConfigError(f"cannot use the service account key {path!r}: {exc}") from None
        try:
            credentials = google.oauth2.service_account.Credentials.from_service_account_file(
                path, scopes=list(scopes)
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot read the service account key {path!r}: {exc.strerror or exc}"
            ) from None
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{path!r} is not a service account JSON key: {exc}") from None
        email = getattr(credentials, "service_account_email", "")
        return cls(credentials, environ=environ, description=f"the service account key {path} ({email})")

    @property
    def description(self) -> str:
        return self._description

    def __repr__(self) -> str:
        return f"GoogleAuthTokenSource({self._description!r})"

    def fetch(self, deadline: Deadline) -> tuple[str, float]:
        seconds = deadline.remaining_or(self.timeout)
        if not self._lock.acquire(timeout=time_left(deadline)):
            raise deadline_passed(self._description, seconds)
        try:
            self.credentials.refresh(_request_class(self._google)(self, deadline))  # type: ignore[no-untyped-call]
        except self._google.auth.exceptions.GoogleAuthError as exc:
            if deadline.expired():
                raise deadline_passed(self._description, seconds) from None
            raise TokenError(f"{self._description}: {exc}") from None
        finally:
            self._lock.release()
        token, expiry = self.credentials.token, self.credentials.expiry
        if not isinstance(token, str) or not isinstance(expiry, datetime.datetime):
            raise TokenError(f"{self._description} gave no token with an expiry")
        # google-auth keeps expiries as naive UTC datetimes.
        return token, expiry.replace(tzinfo=datetime.timezone.utc).timestamp()

    def request(
        self,
        deadline: Deadline,
        url: str,
        method: str,
        body: bytes | str | None,
        headers: Mapping[str, str] | None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request for google-auth: (status, headers, body).

        Raises:
            DeadlineExpired, OSError, WireError, ValueError: as the transport fails.
        """
        parts = urllib.parse.urlsplit(url)
        origin = parse_origin(f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2]}")
        if origin.scheme not in ("http", "https"):
            raise ValueError(f"google-auth asked for a {origin.scheme} URL")
        route = Route(origin, proxy=self._proxies.proxy_for(origin.scheme, origin.host, origin.port))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        payload = body.encode() if isinstance(body, str) else (body or b"")
        fields = [("Host", origin.authority), ("Accept-Encoding", "gzip")]
        fields += [(name, value) for name, value in (headers or {}).items() if name.lower() != "host"]
        answer = fetch(
            route,
            method,
            path,
            fields=fields,
            body=payload,
            deadline=deadline,
            limit=MAX_TOKEN_RESPONSE_BYTES,
            context=self._context,
            user_agent=f"cipdplugin/{__version__}",
        )
        data = answer.body
        if (answer.headers.get("Content-Encoding") or "").strip().lower() == "gzip":
            data = gunzip(data, MAX_TOKEN_RESPONSE_BYTES)
        return answer.status, {name.lower(): value for name, value in answer.headers.fields}, data


@functools.cache
def _request_class(google: Any) -> Any:
    """google-auth's transport interface over ``GoogleAuthTokenSource.request``.

    Defined on first use: its base classes exist only where google-auth is installed.
    """

    class Answer(google.auth.transport.Response):  # type: ignore[misc]
        def __init__(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self._status, self._headers, self._data = status, headers, data

        @property
        def status(self) -> int:
            return self._status

        @property
        def headers(self) -> dict[str, str]:
            return self._headers

        @property
        def data(self) -> bytes:
            return self._data

    class Request(google.auth.transport.Request):  # type: ignore[misc]
        def __init__(self, source: GoogleAuthTokenSource, deadline: Deadline) -> None:
            self._source, self._deadline = source, deadline

        def __call__(
            self,
            url: str,
            method: str = "GET",
            body: bytes | str | None = None,
            headers: Mapping[str, str] | None = None,
            timeout: float | None = None,
            **kwargs: object,
        ) -> Answer:
            deadline = self._deadline if timeout is None else self._deadline.sooner(float(timeout))
            try:
                return Answer(*self._source.request(deadline, url, method, body, headers))
            except DeadlineExpired:
                raise google.auth.exceptions.TransportError("no answer in time") from None
            except (OSError, WireError, ValueError) as exc:
                raise google.auth.exceptions.TransportError(str(exc)) from None

    return Request
