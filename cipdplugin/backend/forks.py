"""What a forked child must forget: connections and requests in flight that are the parent's.

Objects register with ``track``; right after ``os.fork()``, in the child (which
has only the forking thread), each one's ``forget_after_fork`` runs: it makes
new locks (a lock another parent thread held at the fork would stay held
forever) and drops per-process state, such as the parent's sockets.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ForkAware(Protocol):
    def forget_after_fork(self) -> None: ...


_TRACKED: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def track(owner: ForkAware) -> None:
    """Call ``owner.forget_after_fork()`` in every child forked from now on (while it lives)."""
    _TRACKED.add(owner)


def _after_fork_in_child() -> None:
    for owner in list(_TRACKED):
        owner.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
