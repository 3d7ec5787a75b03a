"""``DaemonThreads``: the one thread pool of cipdplugin, on both sides.

The host's gRPC server and the plugin SDK's admission handlers run on it.
Unlike ``concurrent.futures.ThreadPoolExecutor``, its threads are daemons:
a thread may sit in a plugin's stream, or in a handler stuck in user code,
when the interpreter exits, and that must not keep the process alive (the
host's exit hook still has plugins to stop; a plugin told to stop must
leave). Its owner ends it with ``stop()``.

Both sides use it, so it imports nothing of ours but the deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from queue import Empty, SimpleQueue
from typing import Any

from cipdplugin.deadline import Deadline

_Work = tuple[futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreads(futures.Executor):
    """Daemon threads, started on demand up to ``limit``; idle ones wait for work.

    A submitted call starts a new thread only when none is idle, so a burst
    gets its threads at once and a steady load reuses the same few.
    """

    def __init__(self, limit: int, *, name: str) -> None:
        if limit < 1:
            raise ValueError(f"a thread pool needs at least one thread, got {limit!r}")
        self._limit = limit
        self._name = name
        self._work: SimpleQueue[_Work | None] = SimpleQueue()
        # Guards the fields below.
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work and not yet promised any
        self._stopped = False

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def thread_count(self) -> int:
        """Threads started so far and not yet told to stop."""
        return len(self._threads)

    def runs_on_this_thread(self) -> bool:
        """Whether the calling thread is one of this pool's."""
        return threading.current_thread() in self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a pool thread; its Future holds the outcome.

        Raises:
            RuntimeError: the pool is stopped.
        """
        future: futures.Future[Any] = futures.Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"the {self._name} threads are stopped")
            if self._idle:
                self._idle -= 1  # promised to the idle thread that takes this call
            elif len(self._threads) < self._limit:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            self._work.put((future, fn, args, kwargs))
        return future

    def stop(self, timeout: float | None = 0.0, *, cancel_futures: bool = False) -> None:
        """Refuse new calls, tell every thread to leave once its call is done,
        and wait for them up to ``timeout`` seconds (None: until they have).

        Calls already queued still run, unless ``cancel_futures``. Idempotent.
        """
        with self._lock:
            self._stopped = True
            threads = list(self._threads)
        if cancel_futures:
            self._cancel_queued()
        for _ in threads:
            self._work.put(None)
        deadline = Deadline(timeout)
        for thread in threads:
            if thread is not threading.current_thread():  # stop() called from a pool thread
                thread.join(deadline.remaining())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``: ``stop()``, waiting without a limit if ``wait``."""
        self.stop(None if wait else 0.0, cancel_futures=cancel_futures)

    def _cancel_queued(self) -> None:
        while True:
            try:
                work = self._work.get_nowait()
            except Empty:
                return
            if work is not None:
                work[0].cancel()

    def _run(self) -> None:
        while True:
            work = self._work.get()  # Cannot hang for good: stop() sends one None per thread.
            if work is None:
                return
            future, fn, args, kwargs = work
            del work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                    del result
            # Nothing of the call is kept while the thread idles.
            del future, fn, args, kwargs
            with self._lock:
                self._idle += 1
