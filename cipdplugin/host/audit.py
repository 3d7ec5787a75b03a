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

What a reader of the log can count on:

* **One record, one line.** Records are JSON with every character outside
  printable ASCII escaped (``ensure_ascii``, and DEL too), so no message can
  hold a byte that a reader splits lines on (LF, CR, U+0085, U+2028,
  U+2029) or that a terminal acts on. Text that is not valid Unicode (a
  plugin's file name that is not UTF-8) is written with its undecodable
  bytes as ``\\xNN``.
* **Whole records or none.** A path is opened once with ``O_APPEND`` and
  each batch goes out with ``os.write``. Should a write stop part way (a
  full disk, a file size limit), the record it cut is removed again
  (``ftruncate``), so the file ends with a whole line and the next batch,
  say once space is free again, starts on a line of its own. Writers using
  this module serialise their batches on the file with ``flock``, so one
  process's cut never removes another's records; a writer that does not,
  appending in the very moment of a failed write, makes the cut unsafe: the
  cut record is then left and an error says where.
* **One failure costs only itself.** Each record is formatted on its own,
  and a callable or a stream is called once per record: a record that
  cannot be formatted, or a call that raises, loses that record alone.
  Every loss is logged at ERROR with the exact number of records lost.
* **Opening never hangs.** A path is opened without blocking: a FIFO that
  nothing reads is an ``OSError`` at once, and only regular files, FIFOs
  and character devices (``/dev/null``, a terminal) are accepted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from cipdplugin.files import file_kind
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
#: Lone surrogates: what ``os.fsdecode`` makes of bytes that are not UTF-8
#: (U+DC80 to U+DCFF), or what a JSON ``\\ud800`` escape gives. No encoder
#: writes them, and JSON readers differ on them, so the log spells them out.
_SURROGATE = re.compile("[\ud800-\udfff]")


def format_timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2026-11-28T06:15:00.123Z``."""
    millis = int(seconds * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000)) + f".{millis % 1000:03d}Z"


def _spell_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    # An undecodable byte (surrogateescape) as the byte, anything else as its code.
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def valid_text(text: str) -> str:
    """``text`` as valid Unicode: lone surrogates spelt as ``\\xNN`` or ``\\uNNNN``."""
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub(_spell_surrogate, text)


def format_line(record: dict[str, Any]) -> str:
    """One record as one line of printable ASCII JSON, newline included."""
    line = json.dumps(record, ensure_ascii=True)
    # ensure_ascii leaves DEL as it is: the one ASCII control it does not escape.
    if "\x7f" in line:
        line = line.replace("\x7f", "\\u007f")
    return line + "\n"


def open_for_append(path: str | os.PathLike[str]) -> tuple[int, bool]:
    """Open ``path`` to append records: (the descriptor, whether it is a regular file).

    Never blocks: the open does not wait for a FIFO's reader.

    Raises:
        OSError: it cannot be opened (a FIFO nothing reads: ``ENXIO``).
        ValueError: it is neither a regular file, a FIFO nor a character device.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise exc from None
        if not stat.S_ISFIFO(mode):  # a socket, a device without its hardware: as the system says
            raise
        reason = f"it is {file_kind(mode)} that nothing reads (start its reader first)"
        raise OSError(errno.ENXIO, reason, os.fspath(path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise ValueError(
                f"audit log {os.fspath(path)!r} is {file_kind(mode)}; "
                "expected a regular file, a FIFO or a character device"
            )
        # Non-blocking was for the open only. Writes block, on the writer
        # thread alone, whose every wait close() bounds.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, stat.S_ISREG(mode)


class AuditLog:
    """Writes one JSON line per resolved check to a path, a stream or a callable.

    Thread-safe. ``record_check`` and ``record_unscoped`` never block and
    never raise; write failures are logged at ERROR on ``logger``, with the
    number of records lost.
    """

    def __init__(self, target: AuditTarget, *, enforced: bool = True, logger: logging.Logger) -> None:
        """Open the log.

        Raises:
            OSError: ``target`` is a path that cannot be opened for appending,
                such as a FIFO that no process reads (at once, never waiting).
            ValueError: ``target`` is a path to something other than a
                regular file, a FIFO or a character device.
            TypeError: ``target`` is none of a path, a stream or a callable.
        """
        self._logger = logger
        self._enforced = bool(enforced)
        self._host_pid = os.getpid()
        self._fd: int | None = None  # a file we opened (O_APPEND), and close
        self._regular = False  # _fd is a regular file: a cut record can be removed
        self._stream: IO[str] | None = None
        self._callable: Callable[[dict[str, Any]], None] | None = None
        if isinstance(target, (str, os.PathLike)):
            self._fd, self._regular = open_for_append(target)
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
        # Guarded by _sink_lock: a record was cut and could not be removed, so
        # the next write starts with a newline to keep its records whole.
        self._torn = False
        # Records of the batch being written; read by close() to say how many
        # it gives up on.
        self._in_flight = 0
        # Guards the two fields below; held only for a moment. Host.close()
        # closes the log on a thread of its own, never inside a record.
        self._lock = threading.Lock()
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
        # A pin's fields are checked ASCII; the other texts are spelt out only
        # when one of them holds a surrogate (one search, not one per field).
        if _SURROGATE.search(f"{message}{plugin}{plugin_version}{service_url}") is not None:
            message, plugin, plugin_version, service_url = map(
                valid_text, (message, plugin, plugin_version, service_url)
            )
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
                self._in_flight = len(items)
                self._write(items)
                self._in_flight = 0

    def _write(self, items: list[tuple[Any, ...]]) -> None:
        """Write one batch; every record lost is logged, with the count. Never raises."""
        records: list[dict[str, Any]] = []
        bad = 0
        first_error: BaseException | None = None
        for item in items:
            try:
                records.append(self._record(item))
            except Exception as exc:  # an outcome whose str() raises, say
                bad += 1
                first_error = first_error or exc
        if bad:
            self._report_loss(bad, len(items), "cannot be formatted", first_error)
        if not records:
            return
        with self._sink_lock:
            if self._callable is not None:
                self._call(records)
            elif self._stream is not None:
                self._write_stream(records)
            else:
                self._append(records)

    def _call(self, records: list[dict[str, Any]]) -> None:
        assert self._callable is not None
        failed = 0
        first_error: BaseException | None = None
        for record in records:
            try:
                self._callable(record)
            except Exception as exc:
                failed += 1
                first_error = first_error or exc
        if failed:
            self._report_loss(failed, len(records), "the callable raised", first_error)

    def _write_stream(self, records: list[dict[str, Any]]) -> None:
        assert self._stream is not None
        failed = 0
        first_error: BaseException | None = None
        for record in records:
            try:
                self._stream.write(format_line(record))
            except Exception as exc:
                failed += 1
                first_error = first_error or exc
        if failed:
            self._report_loss(failed, len(records), "the stream's write raised", first_error)
        try:
            self._stream.flush()
        except Exception:
            # What the stream still buffers is beyond our reach: say how much at most.
            self._logger.exception(
                "%s: cannot flush: up to %d records may be lost", self._description, len(records) - failed
            )

    def _append(self, records: list[dict[str, Any]]) -> None:
        """Append whole lines to the file we opened; cut a record a failed write tore."""
        fd = self._fd
        assert fd is not None
        data = "".join(format_line(record) for record in records).encode("ascii")
        prefix = b"\n" if self._torn else b""
        written = 0
        with self._file_lock(fd):
            try:
                if prefix:
                    self._write_all(fd, prefix)
                    self._torn = False
                view = memoryview(data)
                while written < len(data):
                    written += self._write_once(fd, view[written:])
                return
            except OSError as exc:
                error = exc
            whole = data.rfind(b"\n", 0, written) + 1
            note = ""
            if whole < written:
                note = self._cut(fd, written - whole)
        lost = len(records) - data.count(b"\n", 0, whole)
        self._report_loss(lost, len(records), f"cannot write{note}", error)

    @staticmethod
    def _write_once(fd: int, data: memoryview | bytes) -> int:
        count = os.write(fd, data)
        if count == 0:  # a device that takes nothing and says nothing: do not spin
            raise OSError(errno.EIO, "the write took no bytes")
        return count

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        written = 0
        while written < len(data):
            written += self._write_once(fd, view[written:])

    def _cut(self, fd: int, torn: int) -> str:
        """Remove the last ``torn`` bytes we appended; what to add to the error."""
        if self._regular:
            try:
                # With O_APPEND, the offset is where our last write ended.
                end = os.lseek(fd, 0, os.SEEK_CUR)
                if os.fstat(fd).st_size == end:
                    os.ftruncate(fd, end - torn)
                    return " (the record the write cut short was removed)"
                where = f"another process appended after it, so it stays at byte {end - torn}"
            except OSError as exc:
                where = f"it cannot be removed ({exc.strerror or exc})"
        else:
            where = "a FIFO or device cannot take it back"
        self._torn = True
        return f" (a record the write cut short remains: {where}; the next record starts on a new line)"

    @staticmethod
    @contextlib.contextmanager
    def _file_lock(fd: int) -> Iterator[None]:
        """Exclude other writers of this module from the file for one batch.

        Bounded by how long such a writer holds it: one batch's write.
        """
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: write unlocked
            yield
            return
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _report_loss(self, lost: int, total: int, why: str, error: BaseException | None) -> None:
        self._logger.error(
            "%s: %d of %d records were not written: %s: %s",
            self._description,
            lost,
            total,
            why,
            error,
            exc_info=error if error is not None and not isinstance(error, OSError) else None,
        )

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
                # The stop marker is still queued behind what is left.
                unwritten = self._in_flight + max(0, self._queue.qsize() - 1)
                self._logger.error(
                    "%s: still writing after %s s; giving up on the %d records not yet written",
                    self._description,
                    timeout,
                    unwritten,
                )
                return
        if self._fd is not None:
            with self._sink_lock:
                try:
                    os.close(self._fd)
                except OSError:
                    self._logger.exception("%s: cannot close", self._description)
                self._fd = None
