"""What a host knows about the deployment it guards: the backend URL and metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cipdplugin.protocol.cipd_pb2 import ListMetadataRequest, ListMetadataResponse

#: The public CIPD backend, the default of the command line.
DEFAULT_SERVICE_URL = "https://chrome-infra-packages.appspot.com"


@runtime_checkable
class RepositoryClient(Protocol):
    """A source of instance metadata, asked on behalf of plugins.

    ``list_metadata`` may raise ``grpc.RpcError`` or ``AdmissionError``; the
    status code and message reach the plugin unchanged. It is called from the
    host's server threads, possibly concurrently.
    """

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse: ...


@dataclass(frozen=True)
class Config:
    """The CIPD backend URL a client deploys from, and an optional metadata source.

    Plugins see ``service_url`` in every admission request, and may only list
    metadata for that URL.
    """

    service_url: str
    repository: RepositoryClient | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.service_url, str) or not self.service_url:
            raise ValueError(f"Config.service_url must be a non-empty string, got {self.service_url!r}")
        # isinstance() on a Protocol only checks that the attribute exists.
        if self.repository is not None and not callable(getattr(self.repository, "list_metadata", None)):
            raise TypeError(
                f"Config.repository must have a list_metadata(request) method, got {self.repository!r}"
            )
