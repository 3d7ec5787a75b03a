"""The exceptions of cipdplugin, one shallow hierarchy under ``AdmissionError``.

Every one takes ``(message, *, code=...)``; each class has the code it
usually carries as its default. ``AdmissionError(code, message)``, the order
of luci's ``status.Error(code, msg)`` and of the SPEC's ``admission.Error``,
is accepted too, so handlers written either way work.
"""

from __future__ import annotations

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

    #: The code of an error made without one.
    default_code = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str | grpc.StatusCode = "",
        legacy_message: str = "",
        *,
        code: grpc.StatusCode | None = None,
    ) -> None:
        """``AdmissionError("why", code=grpc.StatusCode.X)``, or ``AdmissionError(X, "why")``.

        Raises:
            TypeError: the code is not a ``grpc.StatusCode``, or the message
                is not a string.
        """
        if isinstance(message, grpc.StatusCode):
            if code is not None:
                raise TypeError("give the code once: AdmissionError(message, code=...)")
            text, code = legacy_message, message
        elif legacy_message:
            raise TypeError("AdmissionError takes (message, *, code=...)")
        else:
            text = message
        if code is None:
            code = self.default_code
        if not isinstance(code, grpc.StatusCode):
            raise TypeError(f"code must be a grpc.StatusCode, got {code!r}")
        if not isinstance(text, str):
            raise TypeError(f"message must be a string, got {text!r}")
        # args holds what the constructor takes back: pickle and copy call
        # cls(*args), then restore __dict__, which holds the code.
        super().__init__(text)
        self.code = code
        self.message = text

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r})"


class AdmissionDenied(AdmissionError):
    """The plugin said no (FAILED_PRECONDITION): a policy decision."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class PluginStartError(AdmissionError):
    """The plugin could not be started, or did not connect properly.

    Covers: the executable could not be launched, it exited before
    connecting, it did not connect within ``connect_timeout``, or it speaks
    another protocol version. The message says which.
    """

    default_code = grpc.StatusCode.UNAVAILABLE


class PluginAbortedError(AdmissionError):
    """The plugin was closed, or died while the check was pending."""

    default_code = grpc.StatusCode.ABORTED


class InvalidPinError(AdmissionError, ValueError):
    """A package name, instance ID, object reference or pin string is malformed.

    A ``ValueError`` for callers validating input, and an ``AdmissionError``
    (code INVALID_ARGUMENT) so one ``except AdmissionError`` covers every way
    a check can fail.
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __str__(self) -> str:
        return self.message
