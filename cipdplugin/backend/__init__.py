"""The client of the real CIPD backend, and the credentials it sends.

``PrpcRepository`` asks the backend for instance metadata over pRPC; the
token sources get OAuth2 access tokens the ways the Go CIPD client does.
Modules, from the top down:

* ``prpc.py``: ``PrpcRepository``, one generic ``_call`` per RPC, retries;
* ``answers.py``: what a pRPC answer means (status, error text, body);
* ``connection.py``: connections along one route (direct, HTTP proxy, CIPD
  proxy), TLS, CONNECT tunnels, the keep-alive pool and its fork guard;
* ``wire.py``: HTTP/1.1 requests and responses, every byte within a deadline;
* ``proxies.py``: which proxy a request takes (Go's ``ProxyFromEnvironment``);
* ``hosts.py``: host names checked and converted to ASCII (IDNA);
* ``tokens.py``: what a token source is, and the cache calls share;
* ``luci_auth.py``, ``luci_context.py``, ``gce.py``, ``google_auth.py``: the
  token sources; ``credentials.py``: ``default_token_source``, which picks one;
* ``forks.py``: what a forked child forgets.

``google_auth.py`` needs the ``cipdplugin[google-auth]`` extra when used;
nothing here imports google-auth before that.
"""

from __future__ import annotations

from cipdplugin.backend.answers import CODE_HEADER, PRPC_BINARY, TIMEOUT_HEADER, encode_timeout, user_agent
from cipdplugin.backend.credentials import GCE_SERVICE_ACCOUNT, default_token_source
from cipdplugin.backend.gce import GceTokenSource
from cipdplugin.backend.google_auth import GoogleAuthTokenSource
from cipdplugin.backend.luci_auth import LuciAuthTokenSource
from cipdplugin.backend.luci_context import LuciContextTokenSource
from cipdplugin.backend.prpc import DEFAULT_TIMEOUT, PrpcRepository
from cipdplugin.backend.tokens import EMAIL_SCOPE, BoundedTokenSource, TokenSource

__all__ = [
    "CODE_HEADER",
    "DEFAULT_TIMEOUT",
    "EMAIL_SCOPE",
    "GCE_SERVICE_ACCOUNT",
    "PRPC_BINARY",
    "TIMEOUT_HEADER",
    "BoundedTokenSource",
    "GceTokenSource",
    "GoogleAuthTokenSource",
    "LuciAuthTokenSource",
    "LuciContextTokenSource",
    "PrpcRepository",
    "TokenSource",
    "default_token_source",
    "encode_timeout",
    "user_agent",
]
