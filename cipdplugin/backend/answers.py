"""pRPC answers: what the status header, the body and its type mean for a call.

The rules of luci-go ``grpc/prpc/client.go`` (``readStatus``, ``readErrorMessage``),
kept apart from the connection work so that a new RPC reuses them whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from cipdplugin.backend.wire import Response, TooBig, WireError, gunzip
from cipdplugin.constants import ERROR_BODY_LIMIT, MAX_RESPONSE_BYTES
from cipdplugin.options import USER_AGENT_PREFIX_ENV, ConfigError
from cipdplugin.status import known_code

PRPC_BINARY = "application/prpc; encoding=binary"
CODE_HEADER = "X-Prpc-Grpc-Code"
TIMEOUT_HEADER = "X-Prpc-Grpc-Timeout"

AnswerT = TypeVar("AnswerT", bound=Message)

#: The codes luci-go's grpcutil treats as transient.
TRANSIENT_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE})
_BINARY_TYPES = frozenset({"application/prpc", "application/protobuf", "application/x-protobuf"})
# pRPC timeout units, finest first: a value has at most 8 digits.
_TIMEOUT_UNITS = ((1, "n"), (10**3, "u"), (10**6, "m"), (10**9, "S"), (60 * 10**9, "M"), (3600 * 10**9, "H"))
_PRINTABLE_LINE = re.compile(r"[\x20-\x7e]*")


class CallFailure(Exception):
    """One failed attempt: the status to report, and whether to try again."""

    def __init__(self, code: grpc.StatusCode, message: str, *, transient: bool) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.transient = transient


def encode_timeout(seconds: float) -> str:
    """A ``X-Prpc-Grpc-Timeout`` value: the finest unit that fits 8 digits, rounded up."""
    nanoseconds = max(math.ceil(seconds * 1e9), 1)
    for unit, suffix in _TIMEOUT_UNITS:
        count = -(-nanoseconds // unit)  # rounded up, in whole integers
        if count <= 99_999_999 or suffix == "H":
            return f"{count}{suffix}"
    raise AssertionError("unreachable: hours always fit")


def user_agent(environ: Mapping[str, str]) -> str:
    """``cipdplugin/<version>``, after ``$CIPD_HTTP_USER_AGENT_PREFIX/`` as the Go client puts it.

    Raises:
        ConfigError: the prefix is not one line of printable ASCII.
    """
    from cipdplugin import __version__  # here: the package imports this module

    own = f"cipdplugin/{__version__}"
    prefix = environ.get(USER_AGENT_PREFIX_ENV, "")
    if not prefix:
        return own
    if not _PRINTABLE_LINE.fullmatch(prefix):
        raise ConfigError(f"${USER_AGENT_PREFIX_ENV} must be one line of printable ASCII")
    return f"{prefix}/{own}"


def decode_answer(response: Response, response_type: type[AnswerT], shown: str) -> AnswerT:
    """The message in ``response``; ``shown`` names the backend in messages.

    Raises:
        CallFailure: the backend's error, or an answer that is not a pRPC
            answer of ``response_type``.
    """
    status, headers, payload = response.status, response.headers, response.body
    if (headers.get("Content-Encoding") or "").strip().lower() == "gzip":
        try:
            payload = gunzip(payload, MAX_RESPONSE_BYTES)
        except TooBig as exc:
            raise CallFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"the answer of {shown} is too big ({exc.detail})",
                transient=False,
            ) from None
        except WireError as exc:
            raise CallFailure(
                grpc.StatusCode.INTERNAL, f"the backend's {exc.message}", transient=False
            ) from None
    code_text = headers.get(CODE_HEADER)
    if code_text is None:
        raise _not_prpc(shown, status, headers.get("Content-Type"), payload)
    try:
        code = known_code(int(code_text.strip()))
    except ValueError:
        raise CallFailure(
            grpc.StatusCode.INTERNAL,
            f"the backend answered an invalid {CODE_HEADER} header {code_text!r} (HTTP {status})",
            transient=False,
        ) from None
    if code is None:
        raise CallFailure(
            grpc.StatusCode.UNKNOWN,
            f"the backend answered unknown gRPC code {code_text.strip()}: {_error_text(payload)}",
            transient=False,
        )
    if code != grpc.StatusCode.OK:
        message = _error_text(payload)
        raise CallFailure(code, message.removesuffix("\n"), transient=code in TRANSIENT_CODES)
    content_type = headers.get("Content-Type") or ""
    media_type, _, parameters = content_type.partition(";")
    encoding = parameters.strip().lower().removeprefix("encoding=").strip() if parameters else ""
    if content_type and (media_type.strip().lower() not in _BINARY_TYPES or encoding not in ("", "binary")):
        raise CallFailure(
            grpc.StatusCode.INTERNAL,
            f"the backend answered OK with content type {content_type!r}, not {PRPC_BINARY!r}",
            transient=False,
        )
    answer = response_type()
    try:
        answer.ParseFromString(payload)
    except DecodeError:
        preview = payload[:32].hex(" ") + (" ..." if len(payload) > 32 else "")
        raise CallFailure(
            grpc.StatusCode.INTERNAL,
            f"the backend's answer ({len(payload)} bytes: {preview}) "
            f"does not decode as a {response_type.DESCRIPTOR.full_name}",
            transient=False,
        ) from None
    return answer


def _not_prpc(shown: str, status: int, content_type: str | None, payload: bytes) -> CallFailure:
    kind = content_type or "no content type"
    what = f"HTTP {status} without a {CODE_HEADER} header ({kind}): {_error_text(payload)!r}"
    if status >= 500:
        code = grpc.StatusCode.UNAVAILABLE if status == 503 else grpc.StatusCode.INTERNAL
        return CallFailure(code, f"{shown} is not answering pRPC: {what}", transient=True)
    transient = status in (408, 429)
    return CallFailure(grpc.StatusCode.INTERNAL, f"{shown} is not a pRPC server: {what}", transient=transient)


def _error_text(payload: bytes) -> str:
    """The body as an error message, cut as the Go pRPC client cuts it."""
    if len(payload) > ERROR_BODY_LIMIT:
        return payload[:ERROR_BODY_LIMIT].decode("utf-8", errors="ignore") + "..."
    return payload.decode("utf-8", errors="replace")
