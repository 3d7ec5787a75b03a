"""``LuciContextTokenSource``: the task account of a LUCI bot, from its local auth server.

On LUCI bots (Swarming tasks, Buildbucket builds) ``LUCI_CONTEXT`` names a
JSON file whose ``local_auth`` section says how to reach a token server on
the machine (luci-go ``lucictx/sections.proto``, ``LocalAuth``)::

    {"local_auth": {"rpc_port": 12345, "secret": "<base64>",
                    "accounts": [{"id": "task", "email": "..."}],
                    "default_account_id": "task"}}

A token is ``POST http://127.0.0.1:<rpc_port>/rpc/LuciLocalAuthService.GetOAuthToken``
with the JSON body ``{"scopes": [...], "secret": ..., "account_id": <default_account_id>}``
(the secret sent back as the file holds it), answered by
``{"access_token": ..., "expiry": <UNIX seconds>}`` or, for a refusal,
``{"error_code": ..., "error_message": ...}`` (luci-go
``auth/integration/localauth/server.go`` and ``rpcs/``, the client in
``auth/internal/luci_ctx.go``). HTTP 400, 403 and 404 (bad request, wrong
secret, unknown account) are errors; HTTP 500 is transient and retried, as
luci's client retries it. The server is on loopback: never through a proxy.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cipdplugin import __version__
from cipdplugin.backend.connection import Route, fetch
from cipdplugin.backend.hosts import Origin
from cipdplugin.backend.tokens import (
    EMAIL_SCOPE,
    BoundedTokenSource,
    TokenError,
    deadline_passed,
    with_retries,
)
from cipdplugin.backend.wire import DeadlineExpired, WireError
from cipdplugin.constants import MAX_TOKEN_RESPONSE_BYTES
from cipdplugin.deadline import Deadline
from cipdplugin.options import ConfigError

LUCI_CONTEXT_ENV = "LUCI_CONTEXT"
_PATH = "/rpc/LuciLocalAuthService.GetOAuthToken"


@dataclass(frozen=True)
class LocalAuth:
    """The ``local_auth`` section of a LUCI_CONTEXT file."""

    rpc_port: int
    secret: str
    default_account_id: str
    accounts: tuple[str, ...]


def read_local_auth(environ: Mapping[str, str]) -> LocalAuth | None:
    """The ``local_auth`` section of the file ``LUCI_CONTEXT`` names; None without one.

    Raises:
        ConfigError: the file cannot be read, is not JSON, or its section is malformed.
    """
    path = environ.get(LUCI_CONTEXT_ENV, "")
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            document = json.loads(file.read())
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {LUCI_CONTEXT_ENV} file {path!r}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"the {LUCI_CONTEXT_ENV} file {path!r} is not JSON: {exc}") from None
    section = document.get("local_auth") if isinstance(document, dict) else None
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"the {LUCI_CONTEXT_ENV} file {path!r} has a local_auth that is not an object")
    port = section.get("rpc_port")
    secret = section.get("secret", "")
    default = section.get("default_account_id", "")
    accounts = section.get("accounts") or []
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"the {LUCI_CONTEXT_ENV} file {path!r} has no valid local_auth.rpc_port")
    if not isinstance(secret, str) or not isinstance(default, str) or not isinstance(accounts, list):
        raise ConfigError(f"the {LUCI_CONTEXT_ENV} file {path!r} has a malformed local_auth section")
    ids = tuple(str(account.get("id", "")) for account in accounts if isinstance(account, dict))
    try:
        secret = _standard_base64(secret)
    except ValueError:
        raise ConfigError(
            f"the {LUCI_CONTEXT_ENV} file {path!r} has a local_auth.secret that is not base64"
        ) from None
    return LocalAuth(port, secret, default, ids)


def _standard_base64(text: str) -> str:
    """The secret as Go sends it back: its bytes in standard, padded base64.

    The file may hold any base64 protobuf's JSON accepts (URL-safe, unpadded);
    luci's server decodes the request with Go's ``encoding/json``, which takes
    the standard alphabet only.

    Raises:
        ValueError: not base64.
    """
    padded = text.strip() + "=" * (-len(text.strip()) % 4)
    raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    return base64.b64encode(raw).decode("ascii")


class LuciContextTokenSource(BoundedTokenSource):
    """Tokens of the default account of ``LUCI_CONTEXT``'s local auth server.

    Args:
        environ: the environment to read ``LUCI_CONTEXT`` from; None means ``os.environ``.
        scopes: the OAuth scopes asked for (default: userinfo.email, as the Go CIPD client).

    Raises:
        ConfigError: no ``LUCI_CONTEXT``, no ``local_auth`` section, or no
            default account in it (luci's ``NewLUCIContextTokenProvider`` refuses those too).

    Raises (when fetching):
        AdmissionError: UNAUTHENTICATED with the server's reason, or
            DEADLINE_EXCEEDED when it did not answer in time.
    """

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, scopes: Sequence[str] = (EMAIL_SCOPE,)
    ) -> None:
        env = os.environ if environ is None else environ
        local_auth = read_local_auth(env)
        if local_auth is None:
            raise ConfigError(f'no "local_auth" in {LUCI_CONTEXT_ENV} (is this a LUCI task?)')
        if not local_auth.default_account_id:
            raise ConfigError(f'no "default_account_id" in {LUCI_CONTEXT_ENV}["local_auth"]')
        self.local_auth = local_auth
        self.scopes = tuple(scopes)
        self._route = Route(Origin("http", "127.0.0.1", local_auth.rpc_port, explicit_port=True))

    @property
    def account(self) -> str:
        return self.local_auth.default_account_id

    @property
    def description(self) -> str:
        return f"LUCI_CONTEXT's local auth server (account {self.account!r})"

    def __repr__(self) -> str:
        return f"LuciContextTokenSource(account={self.account!r}, port={self.local_auth.rpc_port})"

    def fetch(self, deadline: Deadline) -> tuple[str, float]:
        seconds = deadline.remaining_or(self.timeout)
        return with_retries(lambda bound: self._attempt(bound, seconds), deadline, self.description)

    def _attempt(self, deadline: Deadline, seconds: float) -> tuple[str, float]:
        body = json.dumps(
            {"scopes": list(self.scopes), "secret": self.local_auth.secret, "account_id": self.account}
        ).encode()
        try:
            answer = fetch(
                self._route,
                "POST",
                _PATH,
                fields=[("Host", self._route.origin.authority), ("Content-Type", "application/json")],
                body=body,
                deadline=deadline,
                limit=MAX_TOKEN_RESPONSE_BYTES,
                user_agent=f"cipdplugin/{__version__}",
            )
        except DeadlineExpired:
            raise deadline_passed("LUCI_CONTEXT's local auth server", seconds) from None
        except (OSError, WireError) as exc:
            raise TokenError(
                f"local auth server on port {self.local_auth.rpc_port}: {exc}", transient=True
            ) from None
        text = answer.body.decode("utf-8", errors="replace").strip()
        if answer.status != 200:
            raise TokenError(
                f"local auth - HTTP {answer.status}: {text[:200]}", transient=answer.status >= 500
            )
        reply = _json_object(text, "local auth")
        code, message = reply.get("error_code") or 0, reply.get("error_message") or ""
        if code or message:
            raise TokenError(f"local auth - RPC code {code}: {message or 'unknown error'}")
        token, expiry = reply.get("access_token"), reply.get("expiry")
        if not isinstance(token, str) or not token or not isinstance(expiry, (int, float)):
            raise TokenError("local auth answered without an access_token and its expiry")
        return token, float(expiry)


def _json_object(text: str, who: str) -> dict[str, Any]:
    try:
        reply = json.loads(text)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise TokenError(f"{who} answered something else than a JSON object", transient=True)
    return reply
