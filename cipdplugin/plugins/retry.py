"""How long the SDK waits before sending again a call the host refused."""

from __future__ import annotations

import os

from cipdplugin.constants import SDK_RETRY_FIRST_DELAY, SDK_RETRY_MAX_DELAY


def retry_delay(attempt: int) -> float:
    """The wait before trying a refused call again, after ``attempt`` earlier
    retries (0 for the first): ``SDK_RETRY_FIRST_DELAY``, doubled each time
    up to ``SDK_RETRY_MAX_DELAY``, and scaled by a random 50 to 100% so that
    callers refused together do not all come back together.
    """
    base = min(SDK_RETRY_FIRST_DELAY * (1 << min(attempt, 32)), SDK_RETRY_MAX_DELAY)
    # os.urandom, not the random module: importing that would cost start-up time.
    return base * (0.5 + int.from_bytes(os.urandom(2), "big") / 2**17)
