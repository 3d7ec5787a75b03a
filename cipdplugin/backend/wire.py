"""HTTP/1.1 messages on a socket, every byte read within one deadline.

The standard library's ``http.client`` bounds each socket read, not a call:
a server dripping one byte at a time, sending ``100 Continue`` or chunk
trailers forever, or one endless header line, holds it as long as it likes.
It also accepts a body shorter than its ``Content-Length`` when read in parts.
This module reads a response itself, with the few rules a client needs:

* every wait for bytes is bounded by what is left of the call's deadline
  (``DeadlineExpired``), so the whole answer arrives in time or not at all;
* a body is framed by ``Content-Length`` or chunked encoding (or, for a
  server closing the connection, by its end) and must be exactly that long:
  fewer bytes, or bytes beyond it arriving with the answer, are a
  ``WireError``, never a partial answer;
* lines, fields and informational answers are limited (``constants.py``),
  and a gzip body is limited again while it is decompressed.

A ``WireError`` describes what the server sent, never what we sent: request
header values (a token) cannot appear in it.
"""

from __future__ import annotations

import re
import socket
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from cipdplugin.constants import MAX_HEADER_FIELDS, MAX_HEADER_LINE, MAX_INTERIM_RESPONSES
from cipdplugin.deadline import Deadline

_RECV_SIZE = 64 * 1024
#: Bytes inflated at a time: the most a gzip answer can overshoot its limit by.
_INFLATE_CHUNK = 1024 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (.*))?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value we send: visible ASCII and spaces, nothing that ends a line.
_FIELD_VALUE = re.compile(r"[\x20-\x7e]*")


class WireError(Exception):
    """The peer broke HTTP/1.1 or a limit; ``transient``: a retry may succeed."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


class TooBig(WireError):
    """The answer is larger than the limit (on the wire or decompressed); ``detail`` says how."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"the answer is too big ({detail})", transient=False)
        self.detail = detail


class ClosedBeforeAnswer(WireError):
    """The peer closed the connection before the first byte of an answer (a stale keep-alive)."""


class DeadlineExpired(Exception):
    """The call's deadline passed while waiting for the peer."""


class Headers:
    """Header fields in order, looked up without regard to case."""

    def __init__(self, fields: Sequence[tuple[str, str]] = ()) -> None:
        self.fields = list(fields)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (as Go's ``Header.Get``)."""
        wanted = name.lower()
        return next((value for key, value in self.fields if key.lower() == wanted), default)

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.fields if key.lower() == wanted]

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every ``name`` field, lower case."""
        return [
            item.strip().lower() for value in self.get_all(name) for item in value.split(",") if item.strip()
        ]


@dataclass
class Response:
    """One answer: status, fields and the whole body (as sent: not yet decompressed)."""

    status: int
    reason: str
    headers: Headers
    body: bytes = b""
    #: Whether the connection may carry another request.
    reusable: bool = False


def format_request(method: str, target: str, fields: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    """A request's bytes; ``Content-Length`` is added for a body.

    Raises:
        ValueError: a field name is not a token or a value is not one line of
            printable ASCII; the message names the field, never its value.
    """
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header field name {name!r}")
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"the {name} header value is not one line of printable ASCII")
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def send_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    """Write ``data``, each wait bounded by what is left of ``deadline``.

    Raises:
        DeadlineExpired: the peer did not take it in time.
        OSError: the connection failed.
    """
    view = memoryview(data)
    while view:
        sock.settimeout(wait_bound(deadline))
        try:
            sent = sock.send(view)
        except TimeoutError:
            raise DeadlineExpired from None
        view = view[sent:]


class Reader:
    """Buffered reads from one socket, each bounded by a deadline.

    Belongs to one connection, used by one call at a time.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        #: Bytes received since the connection opened.
        self.received = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buffer)

    def _fill(self, deadline: Deadline) -> bool:
        """Receive more bytes; False at the end of the stream."""
        self._sock.settimeout(wait_bound(deadline))
        try:
            chunk = self._sock.recv(_RECV_SIZE)
        except TimeoutError:
            raise DeadlineExpired from None
        self._buffer += chunk
        self.received += len(chunk)
        return bool(chunk)

    def read_line(self, deadline: Deadline, what: str) -> bytes:
        """One line without its CRLF (or bare LF).

        Raises:
            WireError: longer than ``MAX_HEADER_LINE``, or the stream ended first.
        """
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end >= 0:
                if end > MAX_HEADER_LINE:
                    raise WireError(f"the {what} is longer than {MAX_HEADER_LINE} bytes")
                line = bytes(self._buffer[:end]).removesuffix(b"\r")
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_HEADER_LINE:
                raise WireError(f"the {what} is longer than {MAX_HEADER_LINE} bytes")
            start = len(self._buffer)
            if not self._fill(deadline):
                raise WireError(f"the connection closed in the middle of the {what}")

    def read_exact(self, count: int, deadline: Deadline, what: str) -> bytes:
        """Exactly ``count`` bytes.

        Raises:
            WireError: the stream ended first (a short body).
        """
        while len(self._buffer) < count:
            if not self._fill(deadline):
                raise WireError(f"the {what} is shorter than announced: {len(self._buffer)} of {count} bytes")
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def read_to_end(self, limit: int, deadline: Deadline) -> bytes:
        """Everything until the peer closes, at most ``limit`` bytes.

        Raises:
            TooBig: more than ``limit`` bytes.
        """
        while self._fill(deadline):
            if len(self._buffer) > limit:
                raise TooBig(f"more than {limit} bytes")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def read_response(reader: Reader, deadline: Deadline, limit: int, *, head_only: bool = False) -> Response:
    """The next response (informational ones skipped), body included unless ``head_only``.

    Raises:
        WireError: the peer broke HTTP/1.1 or a limit.
        TooBig: the body is larger than ``limit``.
        DeadlineExpired: the deadline passed first.
        OSError: the connection failed.
    """
    start = reader.received - reader.buffered
    for _ in range(MAX_INTERIM_RESPONSES + 1):
        try:
            line = reader.read_line(deadline, "status line")
        except WireError:
            if reader.received - reader.buffered == start and not reader.buffered:
                raise ClosedBeforeAnswer("the connection closed before an answer") from None
            raise
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise WireError(f"the answer is not HTTP/1.1: it begins {line[:40]!r}")
        minor, status = match.group(1), int(match.group(2))
        reason = (match.group(3) or b"").decode("latin-1")
        headers = _read_fields(reader, deadline, "header")
        if status == 101:
            raise WireError("the server switched protocols (HTTP 101) unasked")
        if status >= 200:
            break
    else:
        raise WireError(f"more than {MAX_INTERIM_RESPONSES} informational (1xx) answers")
    response = Response(status, reason, headers)
    if head_only:
        return response
    keep_alive = minor == b"1" and "close" not in headers.tokens("Connection")
    if status in (204, 304):
        response.reusable = keep_alive
        return response
    codings = headers.tokens("Transfer-Encoding")
    lengths = {value.strip() for value in headers.get_all("Content-Length")}
    if codings:
        if codings != ["chunked"]:
            raise WireError(f"unsupported transfer coding {', '.join(codings)!r}", transient=False)
        response.body = _read_chunked(reader, deadline, limit)
        response.reusable = keep_alive
    elif lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise WireError(f"invalid Content-Length {', '.join(sorted(lengths))!r}")
        length = int(next(iter(lengths)))
        if length > limit:
            raise TooBig(f"{length} bytes, more than {limit}")
        response.body = reader.read_exact(length, deadline, "body")
        response.reusable = keep_alive
    else:
        response.body = reader.read_to_end(limit, deadline)
    return response


def _read_fields(reader: Reader, deadline: Deadline, what: str) -> Headers:
    fields: list[tuple[str, str]] = []
    while True:
        line = reader.read_line(deadline, f"{what} line")
        if not line:
            return Headers(fields)
        if len(fields) >= MAX_HEADER_FIELDS:
            raise WireError(f"more than {MAX_HEADER_FIELDS} {what} fields")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name.decode("latin-1")):
            raise WireError(f"malformed {what} line {line[:40]!r}")
        fields.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))


def _read_chunked(reader: Reader, deadline: Deadline, limit: int) -> bytes:
    body = bytearray()
    while True:
        line = reader.read_line(deadline, "chunk size line")
        size_text = line.partition(b";")[0].strip()
        if not size_text or not all(char in b"0123456789abcdefABCDEF" for char in size_text):
            raise WireError(f"malformed chunk size line {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            _read_fields(reader, deadline, "trailer")
            return bytes(body)
        if len(body) + size > limit:
            raise TooBig(f"more than {limit} bytes")
        body += reader.read_exact(size, deadline, "chunk")
        if reader.read_exact(2, deadline, "chunk") != b"\r\n":
            raise WireError("a chunk is longer than its size line says")


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a gzip body (one member or several), producing at most ``limit`` bytes.

    The limit is checked while decompressing, a chunk at a time, so a small
    bomb never becomes a buffer much larger than the limit.

    Raises:
        TooBig: it decompresses to more than ``limit`` bytes.
        WireError: not valid gzip (not transient).
    """
    output = bytearray()
    rest = data
    try:
        while True:
            member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            pending = rest
            while True:
                chunk = member.decompress(pending, _INFLATE_CHUNK)
                output += chunk
                if len(output) > limit:
                    raise TooBig(f"more than {limit} bytes once decompressed")
                pending = member.unconsumed_tail
                if member.eof or (not pending and len(chunk) < _INFLATE_CHUNK):
                    break
            if not member.eof:
                raise WireError("the gzip answer is truncated", transient=False)
            rest = member.unused_data
            if not rest:
                return bytes(output)
    except zlib.error as exc:
        raise WireError(f"the gzip answer does not decompress: {exc}", transient=False) from None


def time_left(deadline: Deadline) -> float:
    """What is left of a call's (finite) deadline, in seconds: 0.0 once passed."""
    left = deadline.remaining()
    return 0.0 if left is None else left


def wait_bound(deadline: Deadline) -> float:
    """What is left of a call's deadline, as a socket timeout; a call always has one.

    Raises:
        DeadlineExpired: nothing is left.
    """
    left = deadline.remaining()
    if left is None:
        raise ValueError("a call without a deadline: every wait on a peer must be bounded")
    if left <= 0:
        raise DeadlineExpired
    return left
