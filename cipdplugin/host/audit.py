"""The decision audit log: one JSON line per resolved admission check.

``Host(..., audit_log=...)`` takes a path (opened in append mode), a text
stream, or a callable that receives each record as a dict. A record::

    {"ts": "2026-11-28T06:15:00.123Z", "pin": "infra/tools/x:<id>",
     "package": "infra/tools/x", "instance_id": "<id>",
     "verdict": "admitted" | "denied" | "error" | "unscoped",
     "code": "OK" | "<gRPC status code name>", "message": "<str>",
     "plugin": "<display name>", "plugin_version": "<str>",
     "service_url": "<str>", "latency_ms": 12.345, "enforced": true,
     "host_pid": 4242}

Design: a check is queued for the log *before* its promise resolves, and
one writer thread, owned by this object, formats and writes what is queued
in batches. So a slow or failing sink never delays a verdict, lines never
interleave (one writer, one lock around write and flush), and
``close()`` (called by ``Host.close()``) can drain the queue: every check
resolved before it returns is in the log, flushed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from cipdplugin.pins import Pin
from cipdplugin.status import verdict_of

#: What ``Host(audit_log=...)`` accepts.
AuditTarget = str | os.PathLike[str] | IO[str] | Callable[[dict[str, Any]], None]

#: The verdict of a pin no plugin of a chain covers (the others: ``cipdplugin.status``).
UNSCOPED = "unscoped"
#: Records formatted and written per batch at most, so a burst reaches the
#: sink in large writes without holding everything in one string.
_BATCH = 1024
#: How long the writer lets records gather after the first of a batch. Waking
#: the writer once per record would cost the resolving threads a GIL hand-over
#: each, several times the cost of writing the record; close() cuts it short.
_GATHER = 0.02
#: Tells the writer thread that nothing more will come.
_STOP = None
#: The outcome of a pin no plugin covers.
_UNSCOPED = object()


def format_timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2026-11-28T06:15:00.123Z``."""
    millis = int(seconds * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000)) + f".{millis % 1000:03d}Z"


class AuditLog:
    """Writes one JSON line per resolved check to a path, a stream or a callable.

    Thread-safe. ``record_check`` and ``record_unscoped`` never block and
    never raise; write failures are logged at ERROR on ``logger``.
    """

    def __init__(self, target: AuditTarget, *, enforced: bool = True, logger: logging.Logger) -> None:
        """Open the log.

        Raises:
            OSError: ``target`` is a path that cannot be opened for appending.
            TypeError: ``target`` is none of a path, a stream or a callable.
        """
        self._logger = logger
        self._enforced = bool(enforced)
        self._host_pid = os.getpid()
        self._owned: IO[str] | None = None  # a file we opened, and close
        self._stream: IO[str] | None = None
        self._callable: Callable[[dict[str, Any]], None] | None = None
        if isinstance(target, (str, os.PathLike)):
            self._owned = self._stream = open(target, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
            self._description = f"audit log {os.fspath(target)!r}"
        elif hasattr(target, "write"):
            self._stream = target  # type: ignore[assignment]
            self._description = "audit log stream"
        elif callable(target):
            self._callable = target
            self._description = "audit log callable"
        else:
            raise TypeError(f"audit_log must be a path, a text stream or a callable, got {target!r}")
        # Checks waiting to be written: tuples, formatted by the writer thread.
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        # Held around every write and flush of the sink, by the writer thread
        # (and close()). Producers never take it, so a stuck sink stalls no one.
        self._sink_lock = threading.Lock()
        # Guards the two fields below; held only for a moment. Re-entrant:
        # Host.close() may run in a signal handler that interrupted a record.
        self._lock = threading.RLock()
        self._writer: threading.Thread | None = None  # started by the first record
        self._closed = False  # close() was called: later records are dropped
        self._closing = threading.Event()  # set by close(): the writer stops gathering

    @property
    def enforced(self) -> bool:
        return self._enforced

    # -- Producers (any thread) --------------------------------------------------

    def record_check(
        self,
        pin: Pin,
        outcome: BaseException | None,
        *,
        plugin: str,
        plugin_version: str,
        service_url: str,
        enqueued: float,
    ) -> None:
        """Queue the record of a check resolving now with ``outcome``.

        ``enqueued`` is the ``time.monotonic()`` of the check's enqueueing;
        the latency runs from there to now.
        """
        now = time.monotonic()
        self._put((time.time(), pin, outcome, plugin, plugin_version, service_url, now - enqueued))

    def record_unscoped(self, pin: Pin, *, service_url: str) -> None:
        """Queue the record of a pin that no plugin of a chain covers."""
        self._put((time.time(), pin, _UNSCOPED, "", "", service_url, 0.0))

    def _put(self, item: tuple[Any, ...]) -> None:
        with self._lock:
            # Under the lock: nothing may follow the stop marker close() queues.
            if self._closed:
                self._logger.debug("%s is closed: the record of %s is dropped", self._description, item[1])
                return
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="cipdplugin-audit", daemon=True)
                self._writer.start()
            self._queue.put(item)

    # -- The writer thread -------------------------------------------------------

    def _record(self, item: tuple[Any, ...]) -> dict[str, Any]:
        ts, pin, outcome, plugin, plugin_version, service_url, latency = item
        if outcome is _UNSCOPED:
            verdict, code, message = UNSCOPED, "OK", "no plugin of the chain covers this package"
        else:
            verdict, status, message = verdict_of(outcome)
            code = status.name
        return {
            "ts": format_timestamp(ts),
            "pin": f"{pin.package}:{pin.instance_id}",
            "package": pin.package,
            "instance_id": pin.instance_id,
            "verdict": verdict,
            "code": code,
            "message": message,
            "plugin": plugin,
            "plugin_version": plugin_version,
            "service_url": service_url,
            "latency_ms": round(latency * 1000, 3),
            "enforced": self._enforced,
            "host_pid": self._host_pid,
        }

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            # Cannot hang: close() queues the stop marker.
            batch = [self._queue.get()]
            self._closing.wait(_GATHER)
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP:
                batch.pop()
                stopping = True
            items = [item for item in batch if item is not None]
            if items:
                self._write(items)

    def _write(self, items: list[tuple[Any, ...]]) -> None:
        try:
            records = [self._record(item) for item in items]
            with self._sink_lock:
                if self._callable is not None:
                    for record in records:
                        self._callable(record)
                else:
                    assert self._stream is not None
                    # One write per batch: lines of other processes appending
                    # to the same file land between batches, not inside lines.
                    self._stream.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                    self._stream.flush()
        except Exception:
            self._logger.exception("%s: cannot write %d records", self._description, len(items))

    # -- Closing ------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, flush, and stop the writer. Idempotent.

        Waits up to ``timeout`` seconds (None: until done) for a slow sink;
        records still unwritten then are reported at ERROR. A file opened
        from a path is closed; a stream or callable given is left open.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
        self._closing.set()
        if writer is not None:
            self._queue.put(_STOP)
            writer.join(timeout)
            if writer.is_alive():
                self._logger.error(
                    "%s: still writing after %s s; giving up on the rest", self._description, timeout
                )
                return
        if self._owned is not None:
            with self._sink_lock:
                try:
                    self._owned.close()
                except OSError:
                    self._logger.exception("%s: cannot close", self._description)
