"""How a call reaches its servant on the host's asyncio server.

Every handler is a coroutine on the server's event loop (``transport``),
one thread that serves every plugin's calls. So nothing on it may block,
and nothing on it runs the embedding program's code:

* **Blocking work runs on the server's pool.** A method marked
  ``blocking`` (one that asks the host's repository or logs through the
  program's handlers) is served on a pool thread, and its coroutine waits
  for it without holding the loop. A servant of a quick method that has to
  do something of the kind hands it to the pool with ``Call.offload``.
* **Accounting.** Every handler is stream-shaped (a unary call and a
  one-message stream look the same on the wire): it runs at once and reads
  the request itself, so the ``finally`` that gives the call's place in its
  plugin's budget back always runs, for a call cancelled before its request
  came too. A blocking servant still running when its call is cancelled
  keeps the place until it returns: a plugin that cancels its calls holds
  no more pool threads than its budget.
* **Parsing.** The request arrives as bytes and is parsed here; a bad one
  fails the call with INTERNAL, as grpcio's own parsing does, with only the
  parse error's text (never the exception, whose traceback would hold the
  call in a reference cycle).
* **Failing.** A servant fails its call by raising ``CallFailed``; the
  handler ends the call with its status (see ``_fail``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from cipdplugin.deadline import Deadline
from cipdplugin.threads import DaemonThreads

T = TypeVar("T")
#: What ``read()`` returns once the plugin has sent all (grpc-stubs lack it).
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]


class CallFailed(Exception):
    """Raised by a servant to end its call with ``code`` and ``details``;
    ``then()`` runs once that status has been sent."""

    def __init__(
        self, code: grpc.StatusCode, details: str, *, then: Callable[[], None] | None = None
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.then = then


class LoopPool:
    """The server's pool as its loop uses it: work handed to a pool thread,
    and its outcome handed back to the loop in batches, with one wakeup of
    the loop for all the work that ended while it was busy (under load,
    most of it), where ``asyncio.wrap_future`` wakes it once per outcome."""

    def __init__(self, pool: DaemonThreads) -> None:
        self._pool = pool
        self._loop: asyncio.AbstractEventLoop | None = None  # set once, before any call
        # Guards the two fields below: pool threads add, the loop takes.
        self._lock = threading.Lock()
        self._ended: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._wakeup_sent = False  # a _deliver is on its way to the loop

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop outcomes go to: the server's, once it runs."""
        self._loop = loop

    def offload(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the pool, not waiting for it (what it raises is logged)."""
        self._pool.run_soon(fn)

    def run(
        self, fn: Callable[..., T], *args: Any, then: Callable[[], None] | None = None
    ) -> asyncio.Future[T]:
        """``fn(*args)`` on the pool; its outcome, on the loop. ``then()``
        runs on the pool thread once ``fn`` returns, whether or not anyone
        still awaits the outcome. On the loop only.

        Raises:
            RuntimeError: the pool is stopped.
        """
        assert self._loop is not None
        outcome: asyncio.Future[T] = self._loop.create_future()
        self._pool.run_soon(self._work, outcome, fn, args, then)
        return outcome

    def _work(
        self,
        outcome: asyncio.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        then: Callable[[], None] | None,
    ) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        finally:
            if then is not None:
                then()
        with self._lock:
            self._ended.append((outcome, result, error))
            wake = not self._wakeup_sent
            self._wakeup_sent = True
        # The error's traceback holds this frame: without these, the frame
        # would hold the error and the outcome in a reference cycle.
        del outcome, result, error
        if wake:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits any more
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            ended, self._ended = self._ended, []
            self._wakeup_sent = False
        for outcome, result, error in ended:
            if outcome.cancelled():
                continue
            if error is None:
                outcome.set_result(result)
            else:
                outcome.set_exception(error)


class Call:
    """What a servant knows of the call it serves, and how it leaves the loop."""

    __slots__ = ("_pool", "deadline")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], pool: LoopPool) -> None:
        self.deadline = Deadline(context.time_remaining())  # the plugin's own (never, without one)
        self._pool = pool

    def offload(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the server's pool, not waiting for it (what it raises is logged)."""
        self._pool.offload(fn)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the server's pool, awaited without holding the loop."""
        return await self._pool.run(fn, *args)


#: ``serve(request, call)``: a response; for a streaming method an async iterator of them.
Serve = Callable[[Any, Call], Any]


#: What ``_read`` returns when the call has failed (its status is set).
_FAILED = object()


async def _read(request_type: type[Message], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    data = await context.read()
    if data is _EOF:
        return await _fail(
            context, grpc.StatusCode.INTERNAL, f"the call sent no {request_type.DESCRIPTOR.full_name}"
        )
    try:
        return request_type.FromString(data)
    except Exception as exc:  # as broad as grpcio's own deserialization
        error = str(exc)
    return await _fail(
        context,
        grpc.StatusCode.INTERNAL,
        f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {error}",
    )


async def _fail(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str) -> object:
    """End the call with ``code``: the status is sent before this returns.

    ``context.abort()`` raises an exception that grpcio keeps in the call's
    state (and raises again itself once the handler returns); its traceback
    would hold the handler's frame, which holds the call: a reference cycle
    that keeps the call, and grpc's asyncio layer with its poller thread,
    alive until the cycle collector runs. So it is caught here and kept
    without one.
    """
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError as aborted:
        # Nor through what it was raised while handling (a CallFailed).
        aborted.__traceback__ = aborted.__context__ = None
    return _FAILED


async def _failed(context: grpc.aio.ServicerContext[Any, Any], failure: CallFailed) -> None:
    # Its traceback, and that of the error it was raised from, hold frames
    # that hold the call (and the handler's frame holds the failure).
    failure.__traceback__ = failure.__context__ = failure.__cause__ = None
    await _fail(context, failure.code, failure.details)
    if failure.then is not None:
        failure.then()


def method_handler(
    serve: Serve,
    request_type: type[Message],
    response_type: type[Message],
    *,
    pool: LoopPool,
    streaming: bool = False,
    blocking: bool = False,
    on_end: Callable[[], None],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler calling ``serve`` with the parsed request; ``on_end()`` runs once the call is over.

    ``streaming``: ``serve`` returns an async iterator of responses, on the
    loop. ``blocking``: ``serve`` runs on ``pool``.
    """

    if streaming:

        async def serve_stream(
            requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                request = await _read(request_type, context)
                if request is _FAILED:
                    return
                responses: AsyncIterator[Any] = serve(request, Call(context, pool))
                async for response in responses:
                    yield response
            except CallFailed as failure:
                await _failed(context, failure)
            finally:
                on_end()

        return grpc.stream_stream_rpc_method_handler(
            serve_stream, response_serializer=response_type.SerializeToString
        )

    async def serve_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        ended_here = True
        try:
            request = await _read(request_type, context)
            if request is _FAILED:
                return None
            call = Call(context, pool)
            if not blocking:
                return serve(request, call)
            # Once the servant runs, it gives the call's place back when it
            # returns, even if the call is cancelled meanwhile.
            answer = pool.run(serve, request, call, then=on_end)
            ended_here = False
            return await answer
        except CallFailed as failure:
            await _failed(context, failure)
            return None
        finally:
            if ended_here:
                on_end()

    return grpc.stream_unary_rpc_method_handler(
        serve_unary, response_serializer=response_type.SerializeToString
    )


def refusal_handler(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that ends a call at once, without reading its request (which
    a call that never sends one would make a unary handler wait for)."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await _fail(context, code, details)

    return grpc.stream_unary_rpc_method_handler(refuse)
