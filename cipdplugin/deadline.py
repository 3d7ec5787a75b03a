"""``Deadline``: a point in time that waits count down to, in one place.

Both sides use it (the host and the plugin SDK), so it imports nothing of ours.
"""

from __future__ import annotations

import math
import threading
import time


class Deadline:
    """A moment on the monotonic clock, or never (``Deadline(None)``).

    ``remaining()`` is what every bounded wait takes: never negative, and
    never more than the longest wait ``threading`` accepts, so a deadline of
    ``1e300`` seconds waits (practically) forever instead of overflowing.
    """

    __slots__ = ("_at",)

    def __init__(self, seconds: float | None) -> None:
        """A deadline ``seconds`` from now; None means no deadline."""
        self._at = None if seconds is None else time.monotonic() + seconds

    @classmethod
    def at(cls, moment: float | None) -> Deadline:
        """A deadline at ``moment`` on ``time.monotonic()``'s clock."""
        deadline = cls(None)
        deadline._at = moment
        return deadline

    @property
    def moment(self) -> float | None:
        """The deadline on ``time.monotonic()``'s clock, or None for never."""
        return self._at

    def remaining(self) -> float | None:
        """Seconds left (0.0 once passed), capped for ``threading``; None for never."""
        if self._at is None:
            return None
        return min(max(0.0, self._at - time.monotonic()), threading.TIMEOUT_MAX)

    def remaining_or(self, cap: float) -> float:
        """Seconds left, but at most ``cap``: for waits that must end anyway."""
        left = self.remaining()
        return cap if left is None else min(left, cap)

    def expired(self) -> bool:
        return self._at is not None and time.monotonic() >= self._at

    def sooner(self, seconds: float) -> Deadline:
        """This deadline or one ``seconds`` from now, whichever comes first."""
        other = Deadline(seconds)
        if self._at is None or (other._at is not None and other._at < self._at):
            return other
        return self

    def __repr__(self) -> str:
        left = self.remaining()
        return "<Deadline never>" if left is None else f"<Deadline in {left:.3f} s>"


def checked_timeout(value: object, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a finite, positive number of seconds (or zero, if allowed).

    Raises:
        TypeError: not an int or float (a bool is not a number of seconds).
        ValueError: infinite, NaN, negative, or zero when zero is not allowed.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "positive"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return seconds
