"""Access tokens for backend calls: what a token source is, and the cache calls share.

A token source is any callable returning an OAuth2 access token, alone or
with its expiry as a UNIX timestamp (``TokenSource``). The sources of this
package (``LuciAuthTokenSource``, ``LuciContextTokenSource``,
``GceTokenSource``, ``GoogleAuthTokenSource``) also derive from
``BoundedTokenSource``: they take a time limit, so a call's deadline bounds
them, subprocess and requests included.

``TokenCache`` is what one repository's calls share:

* one request at a time (single flight): the calls that need a token while
  one is being fetched wait for that one, each at most until its own
  deadline;
* a bounded source runs on the thread of the call that started the fetch,
  with that call's deadline; a plain callable, which cannot be told a
  deadline, runs on a thread of the cache's, so that no call, not even the
  first, waits for it beyond its own deadline (that thread ends when the
  callable returns: it cannot be interrupted, and holds no lock meanwhile);
* a failure is remembered for ``TOKEN_FAILURE_MEMORY`` seconds, so a dead
  source is not run once per call; a fetch cut short by its caller's
  deadline is not a failure of the source and is not remembered;
* a token is refreshed as luci's auth refreshes it: when it expires within
  ``MIN_TOKEN_LIFETIME`` (10 s) plus a random share of
  ``TOKEN_EXPIRY_JITTER`` (30 s) (``constants.py`` cites the sources);
* every token is checked before use: one line of printable ASCII, with
  surrounding whitespace stripped. An invalid one is UNAUTHENTICATED with a
  message that never contains it.
"""

from __future__ import annotations

import abc
import math
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from cipdplugin.backend import forks
from cipdplugin.backend.wire import time_left
from cipdplugin.constants import (
    MIN_TOKEN_LIFETIME,
    PLAIN_TOKEN_LIFETIME,
    TOKEN_EXPIRY_JITTER,
    TOKEN_FAILURE_MEMORY,
    TOKEN_RETRY_INITIAL,
    TOKEN_RETRY_MAX,
    TOKEN_SOURCE_TIMEOUT,
)
from cipdplugin.deadline import Deadline
from cipdplugin.errors import AdmissionError

#: Returns an OAuth2 access token, alone or with its expiry (a UNIX timestamp).
TokenSource = Callable[[], str | tuple[str, float]]

#: The OAuth scope the Go CIPD client asks for: luci's default
#: (``auth/client/authcli/authcli.go``, ``scopesDefault``).
EMAIL_SCOPE = "https://www.googleapis.com/auth/userinfo.email"

_PRINTABLE_LINE = re.compile(r"[\x20-\x7e]+")


class BoundedTokenSource(abc.ABC):
    """A token source that ends within a time limit it is given.

    Calling it (the ``TokenSource`` interface) fetches with its own
    ``timeout``; ``PrpcRepository`` calls ``fetch`` with what is left of the
    call instead.
    """

    #: Bound on a fetch made by calling the source, in seconds.
    timeout: float = TOKEN_SOURCE_TIMEOUT

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """What the tokens come from, for messages and ``-v`` (never a secret)."""

    @abc.abstractmethod
    def fetch(self, deadline: Deadline) -> tuple[str, float]:
        """A token and its expiry (UNIX time), by ``deadline``.

        Raises:
            AdmissionError: UNAUTHENTICATED saying what failed, or
                DEADLINE_EXCEEDED when ``deadline`` passed first.
        """

    def __call__(self) -> tuple[str, float]:
        return self.fetch(Deadline(self.timeout))


class TokenError(AdmissionError):
    """A token could not be had; ``transient``: asking again may work."""

    default_code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def deadline_passed(what: str, deadline_seconds: float) -> AdmissionError:
    return AdmissionError(
        f"{what} gave no token within {deadline_seconds:g} s", code=grpc.StatusCode.DEADLINE_EXCEEDED
    )


def with_retries(
    attempt: Callable[[Deadline], tuple[str, float]], deadline: Deadline, what: str
) -> tuple[str, float]:
    """``attempt`` again after each transient ``TokenError``, until ``deadline``.

    Delays start at ``TOKEN_RETRY_INITIAL`` and double up to ``TOKEN_RETRY_MAX``.
    """
    delay = TOKEN_RETRY_INITIAL
    while True:
        try:
            return attempt(deadline)
        except TokenError as exc:
            left = time_left(deadline)
            if not exc.transient or delay >= left:
                raise
            time.sleep(delay)  # short, and within the deadline: nothing to wake it for
            delay = min(delay * 2, TOKEN_RETRY_MAX)


def checked_token(token: object) -> str:
    """``token`` stripped of surrounding whitespace, if it can go in a header.

    Raises:
        AdmissionError: UNAUTHENTICATED, saying what is wrong but not the token.
    """
    if not isinstance(token, str):
        raise AdmissionError(
            f"the token source returned {type(token).__name__}, not a token or a (token, expiry) pair",
            code=grpc.StatusCode.UNAUTHENTICATED,
        )
    text = token.strip()
    if not text:
        raise AdmissionError("the token source returned an empty token", code=grpc.StatusCode.UNAUTHENTICATED)
    if not _PRINTABLE_LINE.fullmatch(text):
        raise AdmissionError(
            f"the token source returned an invalid access token ({len(token)} characters): "
            "a token must be one line of printable ASCII",
            code=grpc.StatusCode.UNAUTHENTICATED,
        )
    return text


def _token_and_expiry(answer: object) -> tuple[str, float | None]:
    expiry: object = None
    token = answer
    if isinstance(answer, tuple) and len(answer) == 2:
        token, expiry = answer
    text = checked_token(token)
    if expiry is None:
        return text, None
    if not isinstance(expiry, (int, float)) or isinstance(expiry, bool) or math.isnan(expiry):
        raise AdmissionError(
            f"the token's expiry must be a UNIX timestamp, got {type(expiry).__name__}",
            code=grpc.StatusCode.UNAUTHENTICATED,
        )
    return text, float(expiry)


@dataclass(frozen=True)
class _Abandoned:
    """A fetch cut short by its caller's deadline: the next waiter fetches again."""


class TokenCache:
    """A token source's last token, shared by one repository's calls."""

    def __init__(self, source: TokenSource) -> None:
        self.source = source
        self.description = (
            source.description if isinstance(source, BoundedTokenSource) else "the token source"
        )
        # Guards the fields below; never held while the source runs.
        self._lock = threading.Lock()
        self._token = ""  # empty: none cached
        self._expiry = 0.0  # UNIX time the cached token expires
        self._failure: AdmissionError | None = None  # the last failure, while remembered
        self._failure_until = 0.0  # time.monotonic() when it is forgotten
        self._fetching: Future[str | _Abandoned] | None = None  # the fetch in flight
        forks.track(self)

    def get(self, deadline: Deadline, timeout: float) -> str:
        """A valid token, fetched if needed; waits at most until ``deadline``.

        ``timeout`` is the call's whole limit, for messages.

        Raises:
            AdmissionError: UNAUTHENTICATED (the source failed, now or in
                the last few seconds) or DEADLINE_EXCEEDED (no token in time).
        """
        while True:
            with self._lock:
                if self._token and not _expires_soon(self._expiry):
                    return self._token
                if self._failure is not None and time.monotonic() < self._failure_until:
                    raise AdmissionError(self._failure.message, code=self._failure.code)
                fetching = self._fetching
                leader = fetching is None
                if fetching is None:
                    fetching = self._fetching = Future()
            if leader:
                self._start(fetching, deadline)
            # wait() rather than result(timeout): Python 3.10's futures raise a
            # TimeoutError of their own, not the built-in one.
            futures.wait([fetching], timeout=time_left(deadline))
            if not fetching.done():
                raise AdmissionError(
                    f"no access token from {self.description} within {timeout:g} s",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            try:
                outcome = fetching.result()
            except AdmissionError as exc:
                raise AdmissionError(exc.message, code=exc.code) from None
            if isinstance(outcome, str):
                return outcome
            if deadline.expired():
                raise AdmissionError(
                    f"no access token from {self.description} within {timeout:g} s",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the backend refused it), unless a newer one replaced it."""
        with self._lock:
            if self._token == token:
                self._token = ""

    def _start(self, fetching: Future[str | _Abandoned], deadline: Deadline) -> None:
        if isinstance(self.source, BoundedTokenSource):
            self._fetch(fetching, deadline)
            return
        thread = threading.Thread(
            target=self._fetch, args=(fetching, None), name="cipdplugin-token", daemon=True
        )
        thread.start()

    def _fetch(self, fetching: Future[str | _Abandoned], deadline: Deadline | None) -> None:
        """Run the source once and settle ``fetching`` (the leader's thread, or the cache's)."""
        try:
            if deadline is not None and isinstance(self.source, BoundedTokenSource):
                answer: object = self.source.fetch(deadline)
            else:
                answer = self.source()
            token, expiry = _token_and_expiry(answer)
            if expiry is not None and expiry <= time.time():
                raise AdmissionError(
                    "the token source returned a token that has already expired",
                    code=grpc.StatusCode.UNAUTHENTICATED,
                )
        except BaseException as exc:  # every waiter must learn the outcome, whatever it is
            self._settle_failure(fetching, exc, deadline)
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            self._fetching = None
            self._failure = None
            if expiry is None:
                self._token, self._expiry = token, time.time() + PLAIN_TOKEN_LIFETIME
            elif expiry - time.time() > MIN_TOKEN_LIFETIME:
                self._token, self._expiry = token, expiry
            else:
                self._token = ""  # about to expire: used for the calls waiting now, not kept
        fetching.set_result(token)

    def _settle_failure(
        self, fetching: Future[str | _Abandoned], exc: BaseException, deadline: Deadline | None
    ) -> None:
        cut_short = (
            isinstance(exc, AdmissionError)
            and exc.code == grpc.StatusCode.DEADLINE_EXCEEDED
            and deadline is not None
            and deadline.expired()
        )
        if isinstance(exc, AdmissionError):
            failure = exc
        else:
            failure = AdmissionError(
                f"cannot get an access token from {self.description}: {type(exc).__name__}: {exc}",
                code=grpc.StatusCode.UNAUTHENTICATED,
            )
        with self._lock:
            self._fetching = None
            if not cut_short:
                self._failure = AdmissionError(failure.message, code=failure.code)
                self._failure_until = time.monotonic() + TOKEN_FAILURE_MEMORY
        if cut_short:
            fetching.set_result(_Abandoned())
        else:
            fetching.set_exception(failure)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's fetch in flight does not exist here."""
        self._lock = threading.Lock()
        self._fetching = None


def _expires_soon(expiry: float) -> bool:
    """luci's ``TokenExpiresInRnd``: within the minimum lifetime plus a random share of the jitter."""
    return expiry - time.time() < MIN_TOKEN_LIFETIME + random.uniform(0, TOKEN_EXPIRY_JITTER)
