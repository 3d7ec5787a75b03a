"""What a host knows about the deployment it guards: the backend URL and metadata."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cipdplugin.protocol.cipd_pb2 import ListMetadataRequest, ListMetadataResponse

#: The public CIPD backend, the default of the command line.
DEFAULT_SERVICE_URL = "https://chrome-infra-packages.appspot.com"
# Spaces and control characters cannot appear in a URL the Go client accepts.
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def check_service_url(url: object) -> None:
    """Refuse what is not the root URL of a CIPD backend: ``scheme://host[:port]``.

    The scheme must be http or https and there must be a host; a path other
    than ``/`` is refused too, as ``load_client_options`` refuses it.

    Raises:
        ValueError: ``url`` is not such a URL; the message shows it.
    """
    expected = "an http:// or https:// URL of a CIPD backend, scheme://host[:port]"
    if not isinstance(url, str) or not url:
        raise ValueError(f"Config.service_url must be {expected}, got {url!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"Config.service_url must be {expected}, got {url!r}: {exc}") from None
    if _UNSAFE.search(url) or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Config.service_url must be {expected}, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"Config.service_url must be {expected}, with no path, query or fragment, got {url!r}"
        )


@runtime_checkable
class RepositoryClient(Protocol):
    """A source of instance metadata, asked on behalf of plugins.

    ``list_metadata`` may raise ``grpc.RpcError`` or ``AdmissionError``; the
    status code and message reach the plugin unchanged. It is called from the
    threads of the host's server pool, possibly concurrently.

    A repository whose ``list_metadata`` also takes a keyword ``timeout``
    (``PrpcRepository`` does) is given the time left before the plugin's own
    call gives up, less a second: it should fail within it, with a message
    the plugin can show (the host's answer then reaches the plugin first).
    """

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse: ...


@dataclass(frozen=True)
class Config:
    """The CIPD backend URL a client deploys from, and an optional metadata source.

    Plugins see ``service_url`` in every admission request, and may only list
    metadata for that URL. It must be the root URL of an http or https
    backend (``https://chrome-infra-packages.appspot.com``); anything else
    raises ValueError.
    """

    service_url: str
    repository: RepositoryClient | None = None

    def __post_init__(self) -> None:
        check_service_url(self.service_url)
        # isinstance() on a Protocol only checks that the attribute exists.
        if self.repository is not None and not callable(getattr(self.repository, "list_metadata", None)):
            raise TypeError(
                f"Config.repository must have a list_metadata(request) method, got {self.repository!r}"
            )
