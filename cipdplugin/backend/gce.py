"""``GceTokenSource``: the service account of a Google Compute Engine VM, from its metadata server.

A token is ``GET http://<host>/computeMetadata/v1/instance/service-accounts/<account>/token``
with ``Metadata-Flavor: Google``, answered by ``{"access_token", "expires_in",
"token_type"}`` (luci-go ``auth/internal/gce.go``, through
``cloud.google.com/go/compute/metadata``, which reads the host from
``GCE_METADATA_HOST`` and otherwise uses ``169.254.169.254``). Connection
failures, HTTP 5xx and incomplete answers are transient and retried within
the deadline, as luci tags them; HTTP 404 means the VM has no such account.
The metadata server is never reached through a proxy (Go's metadata client
has a transport of its own, without one).

Only chosen when asked for (``--service-account-json :gce``): the Go CIPD
client never picks the metadata server by itself.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping

from cipdplugin import __version__
from cipdplugin.backend.connection import Route, fetch
from cipdplugin.backend.hosts import parse_origin
from cipdplugin.backend.luci_context import _json_object
from cipdplugin.backend.tokens import BoundedTokenSource, TokenError, deadline_passed, with_retries
from cipdplugin.backend.wire import DeadlineExpired, WireError
from cipdplugin.constants import MAX_TOKEN_RESPONSE_BYTES
from cipdplugin.deadline import Deadline
from cipdplugin.options import ConfigError

METADATA_HOST_ENV = "GCE_METADATA_HOST"
#: The documented metadata server address (``metadataIP`` in Go's metadata package).
METADATA_IP = "169.254.169.254"
_ACCOUNT = re.compile(r"[A-Za-z0-9@._+-]+")


class GceTokenSource(BoundedTokenSource):
    """Tokens of a GCE VM's service account, from the metadata server.

    Args:
        account: the service account: ``default``, or its email.
        environ: where to read ``GCE_METADATA_HOST`` from; None means ``os.environ``.

    Raises:
        ValueError: ``account`` is not an account name.
        ConfigError: ``GCE_METADATA_HOST`` is not ``host[:port]``.

    Raises (when fetching):
        AdmissionError: UNAUTHENTICATED saying what failed, or
            DEADLINE_EXCEEDED when no token came in time.
    """

    def __init__(self, account: str = "default", environ: Mapping[str, str] | None = None) -> None:
        if not isinstance(account, str) or not _ACCOUNT.fullmatch(account) or account in (".", ".."):
            raise ValueError(f"account must be 'default' or a service account's email, got {account!r}")
        env = os.environ if environ is None else environ
        host = env.get(METADATA_HOST_ENV, "") or METADATA_IP
        try:
            if "/" in host or "@" in host:
                raise ValueError("expecting host[:port]")
            origin = parse_origin(f"http://{host}")
        except ValueError as exc:
            raise ConfigError(f"bad {METADATA_HOST_ENV}={host!r}: {exc}") from None
        self.account = account
        self._route = Route(origin)
        self._path = f"/computeMetadata/v1/instance/service-accounts/{account}/token"

    @property
    def description(self) -> str:
        return f"the GCE metadata server at {self._route.origin.authority} (account {self.account!r})"

    def __repr__(self) -> str:
        return f"GceTokenSource(account={self.account!r}, host={self._route.origin.authority!r})"

    def fetch(self, deadline: Deadline) -> tuple[str, float]:
        seconds = deadline.remaining_or(self.timeout)
        return with_retries(lambda bound: self._attempt(bound, seconds), deadline, self.description)

    def _attempt(self, deadline: Deadline, seconds: float) -> tuple[str, float]:
        try:
            answer = fetch(
                self._route,
                "GET",
                self._path,
                fields=[("Host", self._route.origin.authority), ("Metadata-Flavor", "Google")],
                body=b"",
                deadline=deadline,
                limit=MAX_TOKEN_RESPONSE_BYTES,
                user_agent=f"cipdplugin/{__version__}",
            )
        except DeadlineExpired:
            raise deadline_passed("the GCE metadata server", seconds) from None
        except (OSError, WireError) as exc:
            raise TokenError(f"the GCE metadata server is not reachable: {exc}", transient=True) from None
        if answer.status == 404:
            raise TokenError(f"the GCE metadata server has no service account {self.account!r} (HTTP 404)")
        if answer.status != 200:
            text = answer.body.decode("utf-8", errors="replace").strip()[:200]
            raise TokenError(
                f"the GCE metadata server answered HTTP {answer.status}: {text}",
                transient=answer.status >= 500,
            )
        reply = _json_object(answer.body.decode("utf-8", errors="replace"), "the GCE metadata server")
        token, expires_in = reply.get("access_token"), reply.get("expires_in")
        if (
            not isinstance(token, str)
            or not token
            or not isinstance(expires_in, (int, float))
            or not expires_in
        ):
            raise TokenError("the GCE metadata server answered an incomplete token", transient=True)
        return token, time.time() + float(expires_in)
