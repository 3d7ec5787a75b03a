"""Forwarding a plugin's standard ``logging`` records to its host (Host.Log)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.deadline import Deadline
from cipdplugin.protocol import HOST_LOG, plugin_pb2

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
    ``MAX_QUEUED_RECORDS``; a flood drops the excess, and says how many were
    dropped) and a sender thread delivers them.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__()
        self._log = channel.unary_unary(
            HOST_LOG,
            request_serializer=plugin_pb2.LogRequest.SerializeToString,
            response_deserializer=Empty.FromString,
        )
        # Guards the fields below.
        self._cond = threading.Condition()
        self._records: deque[plugin_pb2.LogRequest] = deque()
        self._dropped = 0  # records lost to a full queue since the last report
        self._busy = False  # the sender is delivering a record
        self._stopping = False
        self._sender = threading.Thread(target=self._send_loop, name="cipdplugin-log-sender", daemon=True)
        self._previous_root_level: int | None = None

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
            self._records.clear()
            self._cond.notify_all()
        self._sender.join(deadline.remaining())

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
                self._dropped += 1
                return
            self._records.append(request)
            self._cond.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                # Cannot hang: uninstall() sets _stopping and notifies.
                while not self._records and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                request = self._records.popleft()
                dropped, self._dropped = self._dropped, 0
                self._busy = True
            if dropped:
                self._send(
                    plugin_pb2.LogRequest(severity="warning", message=f"{dropped} log records were dropped")
                )
            self._send(request)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _send(self, request: plugin_pb2.LogRequest) -> None:
        # An error means the host is gone or closing: nobody to tell.
        with contextlib.suppress(grpc.RpcError):
            self._log(request, timeout=_LOG_RPC_TIMEOUT)
