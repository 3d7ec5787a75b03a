"""``cipd.plugin.Host``: the service every plugin may call, whatever its kind.

* ``Log`` logs the plugin's message on the host's logger, at the level its
  severity names.
* ``ListMetadata`` forwards to the host's repository. The plugin's call has
  a deadline (the SDK's ``SDK_CALL_LIMIT``, or the Go SDK's context): a
  repository that takes a ``timeout`` gets the time left before it, less
  ``METADATA_ANSWER_MARGIN``, so the plugin hears the repository's own error
  ("no answer from ... within ...") before its call gives up with a bare
  DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.config import Config, RepositoryClient
from cipdplugin.constants import METADATA_ANSWER_MARGIN
from cipdplugin.errors import AdmissionError
from cipdplugin.host.requests import Call, CallFailed
from cipdplugin.host.transport import Method, Service
from cipdplugin.protocol import cipd_pb2, plugin_pb2
from cipdplugin.status import rpc_error_parts
from cipdplugin.text import printable

#: Log severities of the protocol and the logging levels they map to.
SEVERITY_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class HostServant:
    """The ``cipd.plugin.Host`` service as one plugin sees it."""

    def __init__(self, name: str, config: Callable[[], Config | None], logger: logging.Logger) -> None:
        self._name = name
        self._config = config
        self._logger = logger

    def log(self, request: plugin_pb2.LogRequest, call: Call) -> Empty:
        # An unknown severity is still worth showing: log it as info.
        level = SEVERITY_LEVELS.get(request.severity.lower(), logging.INFO)
        # The plugin's text may hold control characters that forge log lines
        # or drive a terminal: shown escaped.
        self._logger.log(level, "Plugin '%s': %s", self._name, printable(request.message))
        return Empty()

    def list_metadata(
        self, request: plugin_pb2.ListMetadataRequest, call: Call
    ) -> plugin_pb2.ListMetadataResponse:
        config = self._config()
        if config is None:
            raise CallFailed(grpc.StatusCode.INTERNAL, "the host has no config: call Host.initialize first")
        repository = config.repository
        if repository is None:
            raise CallFailed(grpc.StatusCode.UNIMPLEMENTED, "the host has no metadata repository")
        if request.service_url != config.service_url:
            raise CallFailed(
                grpc.StatusCode.PERMISSION_DENIED,
                f"metadata of {request.service_url!r} is not available, only of {config.service_url!r}",
            )
        query = cipd_pb2.ListMetadataRequest(
            package=request.package,
            instance=request.instance,
            keys=request.keys,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        try:
            answer = _ask(repository, query, call.deadline.remaining())
        except AdmissionError as exc:
            raise CallFailed(exc.code, exc.message) from None
        except grpc.RpcError as exc:
            raise CallFailed(*rpc_error_parts(exc)) from None
        except Exception as exc:
            self._logger.exception("metadata repository failed")
            raise CallFailed(grpc.StatusCode.INTERNAL, f"metadata repository failed: {exc!r}") from None
        except BaseException as exc:
            # KeyboardInterrupt or SystemExit raised by the repository's code
            # on this pool thread: no interpreter exit is asked of a pool
            # thread, but the plugin must get an answer rather than wait.
            if threading.current_thread() is threading.main_thread():
                raise
            self._logger.error("metadata repository raised %r", exc)
            raise CallFailed(grpc.StatusCode.INTERNAL, f"metadata repository failed: {exc!r}") from None
        return plugin_pb2.ListMetadataResponse(
            metadata=answer.metadata, next_page_token=answer.next_page_token
        )


def _ask(
    repository: RepositoryClient, query: cipd_pb2.ListMetadataRequest, call_time_left: float | None
) -> cipd_pb2.ListMetadataResponse:
    if call_time_left is not None and _takes_timeout(type(repository)):
        timeout = max(0.0, call_time_left - METADATA_ANSWER_MARGIN)
        return repository.list_metadata(query, timeout=timeout)  # type: ignore[call-arg]
    return repository.list_metadata(query)


@functools.lru_cache(maxsize=64)
def _takes_timeout(repository_type: type[Any]) -> bool:
    """Whether ``repository_type.list_metadata`` takes a ``timeout`` keyword."""
    try:
        parameters = inspect.signature(repository_type.list_metadata).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    timeout = parameters.get("timeout")
    return timeout is not None and timeout.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


HOST_SERVICE = Service(
    "cipd.plugin.Host",
    (
        # Both block: the program's log handlers, and the repository.
        Method("Log", plugin_pb2.LogRequest, Empty, HostServant.log, blocking=True),
        Method(
            "ListMetadata",
            plugin_pb2.ListMetadataRequest,
            plugin_pb2.ListMetadataResponse,
            HostServant.list_metadata,
            blocking=True,
        ),
    ),
)
