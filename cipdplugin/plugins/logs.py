"""Forwarding a plugin's standard ``logging`` records to its host (Host.Log)."""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections import deque

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.constants import SDK_LOG_RETRY_LIMIT
from cipdplugin.deadline import Deadline
from cipdplugin.plugins.retry import retry_delay
from cipdplugin.protocol import HOST_LOG, plugin_pb2
from cipdplugin.status import rpc_error_parts

#: Records waiting to be sent; beyond this, new records are dropped (and counted).
MAX_QUEUED_RECORDS = 10_000
#: Per-call deadline of a Log RPC.
_LOG_RPC_TIMEOUT = 5.0


def severity_of(level: int) -> str:
    """The protocol's severity for a ``logging`` level."""
    if level >= logging.ERROR:
        return "error"
    if level >= logging.WARNING:
        return "warning"
    if level >= logging.INFO:
        return "info"
    return "debug"


class HostLogHandler(logging.Handler):
    """A ``logging.Handler`` that sends records to the host, in order, from one thread.

    ``emit`` never blocks on the network: records queue (up to
    ``MAX_QUEUED_RECORDS``) and a sender thread delivers them. A call the
    host refuses for capacity (RESOURCE_EXHAUSTED) is retried with backoff
    for up to ``SDK_LOG_RETRY_LIMIT`` seconds. Records lost all the same (a
    flood beyond the queue, a refusal that lasts) are counted in
    ``dropped``, and the next record delivered is preceded by a warning
    saying how many; what is still untold when the handler is uninstalled
    goes to stderr, which the host logs too.

    ``metadata`` is added to every call (the ticket, on a channel that does
    not add it itself).
    """

    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__()
        self._log = channel.unary_unary(
            HOST_LOG,
            request_serializer=plugin_pb2.LogRequest.SerializeToString,
            response_deserializer=Empty.FromString,
        )
        self._metadata = metadata
        # Guards the fields below.
        self._cond = threading.Condition()
        self._records: deque[plugin_pb2.LogRequest] = deque()
        self._untold = 0  # records lost and not yet reported to the host
        self._dropped = 0  # records lost in all
        self._busy = False  # the sender is delivering a record
        self._stopping = False
        self._sender = threading.Thread(target=self._send_loop, name="cipdplugin-log-sender", daemon=True)
        self._previous_root_level: int | None = None

    @property
    def dropped(self) -> int:
        """Records that never reached the host (and were counted as lost)."""
        with self._cond:
            return self._dropped

    def install(self) -> None:
        """Attach to the root logger and start sending.

        A root logger left at the default WARNING level is lowered to INFO,
        so that ``logging.info`` in a plugin reaches the host.
        """
        root = logging.getLogger()
        if root.level == logging.WARNING and not root.handlers:
            self._previous_root_level = root.level
            root.setLevel(logging.INFO)
        root.addHandler(self)
        self._sender.start()

    def uninstall(self, timeout: float) -> None:
        """Detach, deliver what is queued within ``timeout``, and stop the sender."""
        root = logging.getLogger()
        root.removeHandler(self)
        if self._previous_root_level is not None:
            root.setLevel(self._previous_root_level)
        deadline = Deadline(timeout)
        with self._cond:
            while (self._records or self._busy) and self._cond.wait(deadline.remaining()):
                pass
            self._stopping = True
            self._lose(len(self._records))
            self._records.clear()
            self._cond.notify_all()
        self._sender.join(deadline.remaining())
        with self._cond:
            untold, self._untold = self._untold, 0
        if untold:
            # The host logs the plugin's stderr: the last place left to say it.
            print(f"{untold} log records could not be sent to the host", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread() is self._sender:
            return  # a record about sending a record would loop forever
        try:
            message = self.format(record) if self.formatter else record.getMessage()
            if record.exc_info and not self.formatter:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            request = plugin_pb2.LogRequest(severity=severity_of(record.levelno), message=message)
        except Exception:
            self.handleError(record)
            return
        with self._cond:
            if self._stopping:
                return
            if len(self._records) >= MAX_QUEUED_RECORDS:
                self._lose(1)
                return
            self._records.append(request)
            self._cond.notify_all()

    def _lose(self, count: int) -> None:
        """Count ``count`` records as lost (the lock held)."""
        self._dropped += count
        self._untold += count

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                # Cannot hang: uninstall() sets _stopping and notifies.
                while not self._records and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                request = self._records.popleft()
                untold, self._untold = self._untold, 0
                self._busy = True
            if untold and not self._send(
                plugin_pb2.LogRequest(severity="warning", message=f"{untold} log records were dropped")
            ):
                with self._cond:
                    self._untold += untold  # still untold; not lost twice
            if not self._send(request):
                with self._cond:
                    self._lose(1)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _send(self, request: plugin_pb2.LogRequest) -> bool:
        """Deliver one record; False if it could not be."""
        deadline = Deadline(SDK_LOG_RETRY_LIMIT)
        for attempt in itertools.count():
            try:
                self._log(request, timeout=_LOG_RPC_TIMEOUT, metadata=self._metadata)
                return True
            except grpc.RpcError as exc:
                # Any other error means the host is gone or closing: nobody to tell.
                if rpc_error_parts(exc)[0] is not grpc.StatusCode.RESOURCE_EXHAUSTED or deadline.expired():
                    return False
            with self._cond:
                # Woken early by uninstall(), which gives up on what is left.
                self._cond.wait(deadline.remaining_or(retry_delay(attempt)))
                if self._stopping:
                    return False
        raise AssertionError("unreachable: the attempts never run out")
