"""Method handlers that read their one request themselves.

Every handler the host serves is stream-shaped on the server side (a unary
call and a one-message stream look the same on the wire), for two reasons:

* **Accounting.** A unary handler does not run until its request has
  arrived; a call cancelled before that never runs it. A stream-shaped
  handler runs at once and reads the request itself, so the ``finally``
  that gives the call's slot back to its plugin's budget always runs.
* **Parsing.** grpcio parses a request with the handler's
  ``request_deserializer``; when that raises, grpcio 1.60 (the floor of our
  range) fails the call with INTERNAL, as later releases do, but leaves the
  connection's socket open after the server stops. So the request arrives
  here as bytes and is parsed in the handler, and the call fails with the
  same status. Only the parse error's text is kept, never the exception: its
  traceback holds grpcio's frames, and through them the call, in a
  reference cycle; on grpcio 1.60 the connection's socket then stays open
  until the cycle collector happens to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

#: ``serve(request, context)``: a response, or for a streaming method an iterator of them.
Serve = Callable[[Any, grpc.ServicerContext], Any]


#: What ``_parse`` returns for a call that ended before its request came.
_CANCELLED = object()


def _parse(request_type: type[Message], requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
    try:
        data = next(requests, None)
    except grpc.RpcError as exc:
        # The plugin cancelled the call before sending its request. grpcio
        # keeps this error in the call's state; with its traceback, it would
        # hold these frames and so the call itself in a reference cycle,
        # with the connection's socket, until the cycle collector runs.
        exc.__traceback__ = None
        return _CANCELLED
    if data is None:
        context.abort(grpc.StatusCode.INTERNAL, f"the call sent no {request_type.DESCRIPTOR.full_name}")
    try:
        return request_type.FromString(data)
    except Exception as exc:  # as broad as grpcio's own deserialization
        error = str(exc)
    context.abort(
        grpc.StatusCode.INTERNAL, f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {error}"
    )


def method_handler(
    serve: Serve,
    request_type: type[Message],
    response_type: type[Message],
    *,
    streaming: bool,
    on_end: Callable[[], None],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler calling ``serve`` with the parsed request; ``on_end()`` runs once the call is over.

    ``streaming``: ``serve`` returns an iterator of responses.
    """

    if streaming:

        def serve_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                request = _parse(request_type, requests, context)
                if request is not _CANCELLED:
                    yield from serve(request, context)
            finally:
                on_end()

        return grpc.stream_stream_rpc_method_handler(
            serve_stream, response_serializer=response_type.SerializeToString
        )

    def serve_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        try:
            request = _parse(request_type, requests, context)
            # Nobody reads the answer to a cancelled call.
            return response_type() if request is _CANCELLED else serve(request, context)
        finally:
            on_end()

    return grpc.stream_unary_rpc_method_handler(
        serve_unary, response_serializer=response_type.SerializeToString
    )


def refusal_handler(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that ends a call at once, without reading its request (which
    a call that never sends one would make a unary handler wait for)."""

    def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    return grpc.stream_unary_rpc_method_handler(refuse)
