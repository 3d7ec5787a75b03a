"""The plugin protocol's services in plain grpcio, for the tests' own hosts.

Some tests need a host that is deliberately not ours: one that speaks the
wire as another implementation would, or that misbehaves in a way ours
never does. They build it on these handlers, written out with grpcio alone
so that nothing of ``cipdplugin.host`` stands behind them.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.protocol import plugin_pb2

Context = grpc.ServicerContext


def protocol_handlers(
    *,
    list_admissions: Callable[[plugin_pb2.ListAdmissionsRequest, Context], Iterator[plugin_pb2.Admission]],
    resolve_admission: Callable[[plugin_pb2.ResolveAdmissionRequest, Context], Empty],
    log: Callable[[plugin_pb2.LogRequest, Context], Empty] | None = None,
    list_metadata: Callable[[plugin_pb2.ListMetadataRequest, Context], plugin_pb2.ListMetadataResponse]
    | None = None,
) -> list[grpc.GenericRpcHandler[Any, Any]]:
    """Handlers for ``cipd.plugin.Admissions``, and for those ``cipd.plugin.Host``
    methods given; the others are UNIMPLEMENTED, as grpcio answers them."""
    handlers = [
        grpc.method_handlers_generic_handler(
            "cipd.plugin.Admissions",
            {
                "ListAdmissions": grpc.unary_stream_rpc_method_handler(
                    list_admissions,
                    request_deserializer=plugin_pb2.ListAdmissionsRequest.FromString,
                    response_serializer=plugin_pb2.Admission.SerializeToString,
                ),
                "ResolveAdmission": grpc.unary_unary_rpc_method_handler(
                    resolve_admission,
                    request_deserializer=plugin_pb2.ResolveAdmissionRequest.FromString,
                    response_serializer=Empty.SerializeToString,
                ),
            },
        )
    ]
    host: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    if log is not None:
        host["Log"] = grpc.unary_unary_rpc_method_handler(
            log,
            request_deserializer=plugin_pb2.LogRequest.FromString,
            response_serializer=Empty.SerializeToString,
        )
    if list_metadata is not None:
        host["ListMetadata"] = grpc.unary_unary_rpc_method_handler(
            list_metadata,
            request_deserializer=plugin_pb2.ListMetadataRequest.FromString,
            response_serializer=plugin_pb2.ListMetadataResponse.SerializeToString,
        )
    if host:
        handlers.append(grpc.method_handlers_generic_handler("cipd.plugin.Host", host))
    return handlers


def stream_from(
    outbox: queue.Queue[plugin_pb2.Admission | None], context: Context
) -> Iterator[plugin_pb2.Admission]:
    """A ListAdmissions stream of what is put in ``outbox``, until None is or the call ends.

    Looks at the call every 0.1 s, so a stream the plugin dropped ends.
    """
    while context.is_active():
        try:
            admission = outbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if admission is None:
            return
        yield admission
