"""Status codes and outcomes, read one way everywhere.

* ``code_of(number)``: the ``grpc.StatusCode`` of a number on the wire;
* ``rpc_error_parts(error)``: the code and details a ``grpc.RpcError`` carries;
* ``verdict_of(outcome)``: what a settled check's outcome means (admitted,
  denied or error, with its code and message), for the audit log, the CLI
  and chains alike.

Both sides use it (the host and the plugin SDK), so it imports only grpc
and the errors.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc

from cipdplugin.errors import AdmissionDenied, AdmissionError

ADMITTED = "admitted"
DENIED = "denied"
ERROR = "error"

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def known_code(number: int) -> grpc.StatusCode | None:
    """The status code numbered ``number`` on the wire; None for a number gRPC does not define."""
    return _BY_NUMBER.get(number)


def code_of(number: int) -> grpc.StatusCode:
    """The status code numbered ``number`` on the wire; UNKNOWN for a number gRPC does not define."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def rpc_error_parts(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a ``grpc.RpcError``.

    UNKNOWN and the exception's text when it does not carry them, as a
    hand-made ``RpcError`` may not.
    """
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    status = code() if callable(code) else None
    text = details() if callable(details) else None
    return (
        status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        text if isinstance(text, str) else str(error),
    )


class Verdict(NamedTuple):
    """What the outcome of a check means."""

    verdict: str  # ADMITTED, DENIED or ERROR
    code: grpc.StatusCode
    message: str


_ADMITTED = Verdict(ADMITTED, grpc.StatusCode.OK, "")


def verdict_of(outcome: BaseException | None) -> Verdict:
    """The verdict of a check that resolved with ``outcome`` (None: admitted).

    A denial is an ``AdmissionDenied``; any other exception is an error,
    with UNKNOWN and the exception described when it is not an
    ``AdmissionError``.
    """
    if outcome is None:
        return _ADMITTED
    if isinstance(outcome, AdmissionDenied):
        return Verdict(DENIED, outcome.code, outcome.message)
    if isinstance(outcome, AdmissionError):
        return Verdict(ERROR, outcome.code, outcome.message)
    return Verdict(ERROR, grpc.StatusCode.UNKNOWN, f"{type(outcome).__name__}: {outcome}")
