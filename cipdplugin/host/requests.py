"""Method handlers that parse their requests themselves.

grpcio parses a request with the handler's ``request_deserializer``. When
that raises, grpcio 1.60 (the floor of our range) fails the call with
INTERNAL, as later releases do, but leaves the connection's socket open after
the server stops: one descriptor leaked for every plugin that ever sent a
malformed message. So the handlers built here take the raw bytes through
gRPC, parse them in the handler, and fail the call with the same status.

Only the parse error's text is kept, never the exception: its traceback
holds grpcio's frames, and through them the call, in a reference cycle; on
grpcio 1.60 the connection's socket then stays open until the cycle
collector happens to run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

#: grpc.unary_unary_rpc_method_handler or one of its siblings.
HandlerKind = Callable[..., "grpc.RpcMethodHandler[Any, Any]"]


class _Malformed:
    """What a request that does not parse becomes, until its handler fails the call."""

    def __init__(self, error: str) -> None:
        self.error = error


def method_handler(
    kind: HandlerKind,
    behavior: Callable[[Any, grpc.ServicerContext], Any],
    request_type: type[Message],
    response_type: type[Message],
) -> grpc.RpcMethodHandler[Any, Any]:
    """``kind(behavior, ...)`` with ``request_type`` requests and ``response_type`` responses."""

    def parse(data: bytes) -> Message | _Malformed:
        try:
            return request_type.FromString(data)
        except Exception as exc:  # as broad as grpcio's own deserialization
            return _Malformed(str(exc))

    def handle(request: Message | _Malformed, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {request.error}",
            )
        return behavior(request, context)

    return kind(handle, request_deserializer=parse, response_serializer=response_type.SerializeToString)
