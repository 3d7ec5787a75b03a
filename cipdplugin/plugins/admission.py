"""Writing admission plugins in Python.

::

    from cipdplugin.plugins import admission

    def handler(request: admission.Request, info: admission.InstanceInfo) -> None:
        if request.package.startswith("experimental/"):
            raise admission.Denied("experimental packages are not allowed")

    if __name__ == "__main__":
        raise SystemExit(admission.run(handler, version="my-plugin 1.0"))

Each admission runs ``handler`` in a worker thread. Returning admits the
instance; ``Denied(message)`` denies it (FAILED_PRECONDITION);
``Error(message, code=code)`` reports that status; any other exception is
reported as ABORTED with the exception described, and the plugin keeps
serving.

Up to ``max_workers`` handlers run at once (``SDK_MAX_WORKERS`` by
default), so that handlers waiting on a slow repository do not hold up the
others; threads are started as admissions arrive and leave after
``IDLE_THREAD_EXPIRY`` seconds idle. Of those handlers, a few
(``SDK_RUNNING_HANDLERS``) run Python at once: a handler waiting in
``info.metadata()`` does not count, nor one that has run for longer than
``PRESUMED_WAITING`` (it is presumed to wait on something of its own). More
would only take turns for the GIL, and slow every admission down.

Answers are sent without waiting for the host to take them, and an answer
the host refuses for capacity is sent again until it is taken (or the
plugin stops); so is a metadata page, within its deadline.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import grpc
from google.protobuf.empty_pb2 import Empty
from google.rpc import status_pb2

from cipdplugin import plugins
from cipdplugin.constants import (
    SDK_CALL_LIMIT,
    SDK_MAX_WORKERS,
    SDK_PAGE_SIZE,
    SDK_RUNNING_HANDLERS,
)
from cipdplugin.deadline import Deadline
from cipdplugin.errors import AdmissionDenied, AdmissionError, InvalidPinError
from cipdplugin.pins import Pin, object_ref_to_instance_id
from cipdplugin.plugins.answers import Answers
from cipdplugin.plugins.retry import retry_delay
from cipdplugin.protocol import (
    ADMISSIONS_LIST,
    ADMISSIONS_RESOLVE,
    HOST_LIST_METADATA,
    PROTOCOL_VERSION,
    cipd_pb2,
    plugin_pb2,
)
from cipdplugin.status import rpc_error_parts
from cipdplugin.threads import DaemonThreads

#: Raise in a handler to deny an admission (FAILED_PRECONDITION).
Denied = AdmissionDenied
#: Raise in a handler to answer ``Error(message, code=code)``.
Error = AdmissionError

DEFAULT_MAX_WORKERS = SDK_MAX_WORKERS
#: The ways a ListAdmissions stream ends that mean "stop", not "fail".
_STOP_CODES = (grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
#: The stream's messages are read by the thread that iterates it, not handed
#: over by grpc's channel thread: one thread switch less per admission.
#: (``grpc.experimental.ChannelOptions.SingleThreadedUnaryStream``, spelled
#: out: importing ``grpc.experimental`` costs start-up time.)
_CHANNEL_OPTIONS = (("SingleThreadedUnaryStream", 1),)

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One admission the host asks about."""

    admission_id: str
    service_url: str
    package: str
    instance: cipd_pb2.ObjectRef
    instance_id: str
    pin: Pin
    #: Set when the host asks the plugin to stop; long handlers may give up.
    stopping: threading.Event = field(repr=False, compare=False)


ListMetadataCall = Callable[..., plugin_pb2.ListMetadataResponse]


class InstanceInfo:
    """What a handler can look up about the instance being admitted.

    ``list_metadata`` is called as ``list_metadata(request, timeout=seconds)``.
    """

    def __init__(self, request: Request, list_metadata: ListMetadataCall):
        self._request = request
        self._list_metadata = list_metadata
        self.stopping = request.stopping

    def metadata(
        self, keys: Iterable[str] = (), page_size: int = SDK_PAGE_SIZE
    ) -> Iterator[cipd_pb2.InstanceMetadata]:
        """The instance's metadata, newest first, fetched page by page as iterated.

        Stop iterating and no further page is fetched. Each page is asked
        for with a deadline of ``SDK_CALL_LIMIT`` seconds.

        Raises:
            AdmissionError: a ListMetadata call failed (its code and message),
                or the host handed out a page token it had handed out before
                (INTERNAL: the pages would loop forever).
            ValueError: ``page_size`` is not positive.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size!r}")
        request = plugin_pb2.ListMetadataRequest(
            service_url=self._request.service_url,
            package=self._request.package,
            instance=self._request.instance,
            keys=list(keys),
            page_size=page_size,
        )
        # Every token asked with: a repository that hands one out again would
        # otherwise be paged forever.
        asked: set[str] = set()
        while True:
            page = self._fetch(request)
            yield from page.metadata
            if not page.next_page_token:
                return
            asked.add(request.page_token)
            if page.next_page_token in asked:
                raise AdmissionError(
                    f"the host's metadata pages loop: page token {page.next_page_token!r} came back "
                    f"after {len(asked)} page(s)",
                    code=grpc.StatusCode.INTERNAL,
                )
            request.page_token = page.next_page_token

    def _fetch(self, request: plugin_pb2.ListMetadataRequest) -> plugin_pb2.ListMetadataResponse:
        try:
            return self._list_metadata(request, timeout=SDK_CALL_LIMIT)
        except grpc.RpcError as exc:
            code, details = rpc_error_parts(exc)
            raise AdmissionError(details, code=code) from None


Handler = Callable[[Request, InstanceInfo], None]


def run(
    handler: Handler,
    *,
    version: str,
    stdin: BinaryIO | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> int:
    """Serve admissions with ``handler`` until the host says stop; return the exit code.

    At most ``max_workers`` handlers run at once; more admissions wait for
    one to finish.

    0 on a normal stop (the stream ended, ABORTED, CANCELLED or UNAVAILABLE),
    2 for a bad handshake, 3 if the host refused the protocol version, 1 for
    any other failure.

    Raises:
        ValueError: ``max_workers`` is not a positive int.
    """
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")

    def run_loop(connection: plugins.Connection, stopping: threading.Event) -> int:
        server = _Server(connection.channel, stopping, handler, max_workers, metadata=connection.metadata)
        return server.serve(version)

    return plugins.serve(run_loop, stdin=stdin, channel_options=_CHANNEL_OPTIONS)


class _Server:
    """The plugin's side of one ListAdmissions stream.

    ``metadata`` is added to every call (the ticket, on a channel that does
    not add it itself).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        stopping: threading.Event,
        handler: Handler,
        max_workers: int,
        *,
        metadata: plugins.CallMetadata = (),
    ):
        self._stopping = stopping
        self._handler = handler
        self._metadata = metadata
        self._list = channel.unary_stream(
            ADMISSIONS_LIST,
            request_serializer=plugin_pb2.ListAdmissionsRequest.SerializeToString,
            response_deserializer=plugin_pb2.Admission.FromString,
        )
        resolve = channel.unary_unary(
            ADMISSIONS_RESOLVE,
            request_serializer=plugin_pb2.ResolveAdmissionRequest.SerializeToString,
            response_deserializer=Empty.FromString,
        )
        self._list_metadata_rpc = channel.unary_unary(
            HOST_LIST_METADATA,
            request_serializer=plugin_pb2.ListMetadataRequest.SerializeToString,
            response_deserializer=plugin_pb2.ListMetadataResponse.FromString,
        )
        self._answers = Answers(resolve, metadata, stopping)
        self._workers = DaemonThreads(
            max_workers, max_running=SDK_RUNNING_HANDLERS, name="cipdplugin-admission"
        )

    def serve(self, version: str) -> int:
        stream = self._list(
            plugin_pb2.ListAdmissionsRequest(protocol_version=PROTOCOL_VERSION, plugin_version=version),
            metadata=self._metadata,
        )
        # Ending the stream is how every way of stopping reaches this loop.
        self._stopping_watch = threading.Thread(
            target=self._cancel_on_stop, args=(stream,), name="cipdplugin-stop-watch", daemon=True
        )
        self._stopping_watch.start()
        run_soon, admit = self._workers.run_soon, self._admit
        try:
            for admission in stream:
                run_soon(admit, admission)
        except grpc.RpcError as exc:
            code, details = rpc_error_parts(exc)
            if code in _STOP_CODES:
                return 0
            print(
                f"admission plugin: the host ended the stream: {code.name}: {details}",
                file=sys.stderr,
            )
            return 3 if code is grpc.StatusCode.FAILED_PRECONDITION else 1
        finally:
            self._stopping.set()
            # Not waited for: a handler stuck in user code must not hold the plugin.
            self._workers.stop()
            self._answers.stop()
        return 0

    def _cancel_on_stop(self, stream: grpc.Future[Any]) -> None:
        self._stopping.wait()  # Cannot hang: serve() sets it on every exit path.
        stream.cancel()

    def _admit(self, admission: plugin_pb2.Admission) -> None:
        resolution = plugin_pb2.ResolveAdmissionRequest(admission_id=admission.admission_id)
        try:
            status = self._decide(admission)
        except BaseException as exc:
            # _decide answers every Exception of the handler; this is ours, or
            # a SystemExit or KeyboardInterrupt: the host still gets an answer.
            _logger.exception("cannot decide admission %s", admission.admission_id)
            resolution.status.CopyFrom(_status(grpc.StatusCode.ABORTED, f"the plugin failed: {exc!r}"))
            self._answers.send(resolution)
            raise
        if status is not None:
            resolution.status.CopyFrom(status)
        self._answers.send(resolution)

    def _list_metadata(
        self, request: plugin_pb2.ListMetadataRequest, timeout: float
    ) -> plugin_pb2.ListMetadataResponse:
        """ListMetadata within ``timeout``, asked again while the host refuses
        it for capacity (a refusal is not the repository's answer).

        Raises:
            grpc.RpcError: the call failed (the last refusal, once the plugin
                stops or the time is up).
        """
        deadline = Deadline(timeout)
        # The handler's thread waits on the host: other handlers run meanwhile.
        with self._workers.waiting():
            for attempt in itertools.count():
                try:
                    response: plugin_pb2.ListMetadataResponse = self._list_metadata_rpc(
                        request, timeout=deadline.remaining(), metadata=self._metadata
                    )
                    return response
                except grpc.RpcError as exc:
                    if (
                        rpc_error_parts(exc)[0] is not grpc.StatusCode.RESOURCE_EXHAUSTED
                        or deadline.expired()
                        or self._stopping.wait(deadline.remaining_or(retry_delay(attempt)))
                    ):
                        raise
        raise AssertionError("unreachable: the attempts never run out")

    def _decide(self, admission: plugin_pb2.Admission) -> status_pb2.Status | None:
        """Run the handler; None means admitted (sent without a status, as the Go SDK does)."""
        try:
            instance_id = object_ref_to_instance_id(admission.instance)
            pin = Pin(admission.package, instance_id)
        except InvalidPinError as exc:
            return _status(grpc.StatusCode.INVALID_ARGUMENT, f"the host sent an invalid pin: {exc}")
        request = Request(
            admission_id=admission.admission_id,
            service_url=admission.service_url,
            package=admission.package,
            instance=admission.instance,
            instance_id=instance_id,
            pin=pin,
            stopping=self._stopping,
        )
        try:
            self._handler(request, InstanceInfo(request, self._list_metadata))
        except AdmissionError as exc:
            return _status(exc.code, exc.message)
        except Exception as exc:
            _logger.debug("admission handler failed on %s", pin, exc_info=True)
            return _status(
                grpc.StatusCode.ABORTED, f"the admission handler raised {type(exc).__name__}: {exc}"
            )
        return None


def _status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)
