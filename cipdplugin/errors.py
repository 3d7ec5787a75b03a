"""The exceptions of cipdplugin, one shallow hierarchy under ``AdmissionError``."""

from __future__ import annotations

from typing import Any

import grpc


class AdmissionError(Exception):
    """An admission check did not admit the instance.

    The base class of every error an admission promise can hold. Raised
    directly when a plugin answered a status other than OK and
    FAILED_PRECONDITION: the check failed unexpectedly.

    Attributes:
        code: the ``grpc.StatusCode`` describing the failure.
        message: a human-readable explanation.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other constructor arguments than ``args`` holds, so
        # pickle and copy rebuild from the attributes instead of calling them.
        return (_restore, (type(self), self.code, self.message), self.__dict__)


def _restore(cls: type[AdmissionError], code: grpc.StatusCode, message: str) -> AdmissionError:
    error = cls.__new__(cls)
    AdmissionError.__init__(error, code, message)
    return error


class AdmissionDenied(AdmissionError):
    """The plugin said no (FAILED_PRECONDITION): a policy decision."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(code, message)


class PluginStartError(AdmissionError):
    """The plugin could not be started, or did not connect properly.

    Covers: the executable could not be launched, it exited before
    connecting, it did not connect within ``connect_timeout``, or it speaks
    another protocol version. The message says which.
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(code, message)


class PluginAbortedError(AdmissionError):
    """The plugin was closed, or died while the check was pending."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.ABORTED) -> None:
        super().__init__(code, message)


class InvalidPinError(AdmissionError, ValueError):
    """A package name, instance ID, object reference or pin string is malformed.

    A ``ValueError`` for callers validating input, and an ``AdmissionError``
    (code INVALID_ARGUMENT) so one ``except AdmissionError`` covers every way
    a check can fail.
    """

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)

    def __str__(self) -> str:
        return self.message
