"""The ``cipd.plugin.Host`` service: what every plugin may ask of its host."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.config import Config
from cipdplugin.errors import AdmissionError
from cipdplugin.host.requests import method_handler
from cipdplugin.host.server import PluginServer
from cipdplugin.protocol import cipd_pb2, plugin_pb2

#: Log severities of the protocol and the logging levels they map to.
SEVERITY_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class HostService:
    """Serves Log and ListMetadata for whichever plugin a ticket names."""

    def __init__(
        self, server: PluginServer, config: Callable[[], Config | None], logger: logging.Logger
    ) -> None:
        self._server = server
        self._config = config
        self._logger = logger

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "cipd.plugin.Host",
            {
                "Log": method_handler(
                    grpc.unary_unary_rpc_method_handler, self.log, plugin_pb2.LogRequest, Empty
                ),
                "ListMetadata": method_handler(
                    grpc.unary_unary_rpc_method_handler,
                    self.list_metadata,
                    plugin_pb2.ListMetadataRequest,
                    plugin_pb2.ListMetadataResponse,
                ),
            },
        )

    def log(self, request: plugin_pb2.LogRequest, context: grpc.ServicerContext) -> Empty:
        session = self._server.session_for(context)
        # An unknown severity is still worth showing: log it as info.
        level = SEVERITY_LEVELS.get(request.severity.lower(), logging.INFO)
        self._logger.log(level, "Plugin '%s': %s", session.name, request.message)
        return Empty()

    def list_metadata(
        self, request: plugin_pb2.ListMetadataRequest, context: grpc.ServicerContext
    ) -> plugin_pb2.ListMetadataResponse:
        self._server.session_for(context)
        config = self._config()
        if config is None:
            context.abort(grpc.StatusCode.INTERNAL, "the host has no config: call Host.initialize first")
        if config.repository is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the host has no metadata repository")
        if request.service_url != config.service_url:
            context.abort(
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
            answer = config.repository.list_metadata(query)
        except AdmissionError as exc:
            context.abort(exc.code, exc.message)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            context.abort(code, details or "")
        except Exception as exc:
            self._logger.exception("metadata repository failed")
            context.abort(grpc.StatusCode.INTERNAL, f"metadata repository failed: {exc!r}")
        return plugin_pb2.ListMetadataResponse(
            metadata=answer.metadata, next_page_token=answer.next_page_token
        )
