"""``default_token_source``: credentials chosen as the Go CIPD client chooses them.

The Go client builds its authenticator with luci's ``auth.SelectBestMethod``
(luci-go ``auth/auth.go``) and the options of ``cipd/client/cli``
(``option_client.go``: ``authcli.Flags``, ``OptionalLogin``), whose
``GCEAllowAsDefault`` is off. The order:

1. a service-account JSON key given with ``-service-account-json``; the
   value ``:gce`` (``auth.GCEServiceAccount``) means the GCE metadata server;
2. the default account of ``LUCI_CONTEXT``'s ``local_auth``, on LUCI bots;
3. the user's ``luci-auth login``.

It never picks the GCE metadata server by itself, and choosing touches no
network: it reads the environment, the LUCI_CONTEXT file and the key file.
Newer luci also has credential helpers (``LUCI_AUTH_CREDENTIAL_HELPER``)
and gcloud's application default credentials (off by default for the CIPD
client); neither is supported here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from cipdplugin.backend.gce import GceTokenSource
from cipdplugin.backend.google_auth import GoogleAuthTokenSource
from cipdplugin.backend.luci_auth import LuciAuthTokenSource
from cipdplugin.backend.luci_context import LuciContextTokenSource, read_local_auth
from cipdplugin.backend.tokens import BoundedTokenSource
from cipdplugin.options import ConfigError

#: The ``-service-account-json`` value that means the GCE metadata server.
GCE_SERVICE_ACCOUNT = ":gce"

_log = logging.getLogger("cipdplugin.backend")


def default_token_source(
    environ: Mapping[str, str] | None = None, *, service_account_json: str | None = None
) -> BoundedTokenSource:
    """The token source the Go CIPD client would use on this machine.

    Args:
        environ: the environment to read (``LUCI_CONTEXT``, proxies, the
            metadata host); None means ``os.environ``.
        service_account_json: a service-account JSON key file, or ``":gce"``
            for the GCE metadata server (needs the ``google-auth`` extra for a file).

    Raises:
        ConfigError: the key cannot be used (missing file, not a key, no
            google-auth), or ``GCE_METADATA_HOST`` is invalid.
    """
    env = os.environ if environ is None else environ
    if service_account_json:
        if service_account_json == GCE_SERVICE_ACCOUNT:
            return GceTokenSource(environ=env)
        return GoogleAuthTokenSource.from_service_account_file(service_account_json, environ=env)
    try:
        local_auth = read_local_auth(env)
    except ConfigError as exc:
        # As the Go client: an unreadable LUCI_CONTEXT counts as none (it says so on stderr).
        _log.warning("%s; ignoring it", exc)
        local_auth = None
    if local_auth is not None and local_auth.default_account_id:
        return LuciContextTokenSource(env)
    return LuciAuthTokenSource()
