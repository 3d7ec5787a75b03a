"""``DaemonThreads``: the one thread pool of cipdplugin, on both sides.

The host's gRPC server and the plugin SDK's admission handlers run on it.
Unlike ``concurrent.futures.ThreadPoolExecutor``, its threads are daemons:
a thread may sit in a plugin's stream, or in a handler stuck in user code,
when the interpreter exits, and that must not keep the process alive (the
host's exit hook still has plugins to stop; a plugin told to stop must
leave). Its owner ends it with ``stop()``.

Under the GIL, threads that run Python code at once only take turns, and
every one more of them costs every call more switching: a pool that starts a
thread whenever none is idle grows to hundreds under a flood of quick calls,
and gets slower for it. Threads that *wait* (on the network, a lock, a sleep)
cost nothing of the kind. So a pool may bound the calls *running* at once
(``max_running``) well below its threads (``limit``), as Go's scheduler runs
goroutines on a few threads and hands a thread's turn to another when its
goroutine blocks in a system call. A call stops counting as running while it
says it waits (``waiting()``), or once it has run ``patience`` seconds (it
is then presumed to wait on something the pool cannot see).

Both sides use it, so it imports nothing of ours but the deadline, the
constants and the futex table's widening (``cipdplugin.futexes``), which a
pool asks for once it has ``FUTEX_TABLE_WIDEN_AT`` threads.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

from cipdplugin.constants import FUTEX_TABLE_WIDEN_AT, IDLE_THREAD_EXPIRY, PRESUMED_WAITING
from cipdplugin.deadline import Deadline
from cipdplugin.futexes import widen_futex_table

#: A call to make: its Future (None for ``run_soon``), the function and its arguments.
_Work = tuple["futures.Future[Any] | None", Callable[..., Any], tuple[Any, ...], dict[str, Any]]
#: What a thread's next call is once it has left the pool.
_LEFT = object()

_logger = logging.getLogger(__name__)

#: Signals sent to the process, which Python handles on its main thread.
_PROCESS_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD")
    if hasattr(signal, name)
)


def leave_signals_to_the_main_thread() -> None:
    """Block the process's signals in the calling thread (the host's server
    loop, which runs none of the program's code and starts no process).

    The kernel gives a signal sent to the process to any thread that does
    not block it. Python runs the handler on the main thread only, at its
    next bytecode: if the signal went to another thread while the main
    thread sleeps in a wait (a verdict, with no timeout), nothing wakes it,
    and a SIGTERM is handled only when the wait ends. The threads grpc
    starts from this one inherit the mask.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _PROCESS_SIGNALS)


def _signal_mask() -> frozenset[int] | None:
    """The calling thread's blocked signals (None where there are no masks)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, ()))


class _State(enum.Enum):
    IDLE = "idle"  # parked on the idle stack, or between calls
    RUNNING = "running"  # in a call, counted in ``_running``
    WAITING = "waiting"  # in a call, inside ``waiting()``
    RETURNING = "returning"  # in a call, back from ``waiting()``, waiting for a turn
    PRESUMED_WAITING = "presumed waiting"  # in a call for longer than ``patience``


class _Worker:
    """One pool thread's mailbox and state, guarded by the pool's lock.

    Whoever takes an idle worker off the idle stack fills ``work`` (or sets
    ``leave``) and then releases ``wake``, which the thread sleeps on.
    """

    __slots__ = ("leave", "start_spare", "started", "state", "wake", "work")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.work: _Work | None = None
        self.leave = False
        self.start_spare = False  # start the threads asked for before its call (_ask_for_spare)
        self.state = _State.IDLE
        self.started = 0.0  # when the current call began (time.monotonic)


class DaemonThreads(futures.Executor):
    """Daemon threads, started on demand up to ``limit``, running at most
    ``max_running`` calls at once (default: ``limit``); idle ones wait for
    work and leave after ``idle_expiry`` seconds without any.

    A call goes to the thread that went idle last (the others can expire),
    else waits in a backlog, which the next thread to finish, to start or
    to begin waiting takes from. A caller that finds no thread idle asks for
    a new one, but a thread that starts takes over starting the next ones a
    burst needs: a burst costs its caller at most one thread start (the
    first), not one per call. And a thread that takes the last idle place
    starts a spare first (``_ask_for_spare``): calls that come one by one,
    each outlasting the gap to the next, cost their caller no thread start
    after the first either.
    """

    def __init__(
        self,
        limit: int,
        *,
        name: str,
        max_running: int | None = None,
        patience: float = PRESUMED_WAITING,
        idle_expiry: float = IDLE_THREAD_EXPIRY,
    ) -> None:
        if limit < 1:
            raise ValueError(f"a thread pool needs at least one thread, got {limit!r}")
        if max_running is not None and max_running < 1:
            raise ValueError(f"max_running must be positive, got {max_running!r}")
        if not (patience > 0 and idle_expiry > 0):
            raise ValueError(f"patience and idle_expiry must be positive, got {patience!r}, {idle_expiry!r}")
        self._limit = limit
        self._max_running = limit if max_running is None else min(max_running, limit)
        self._patience = patience
        self._idle_expiry = idle_expiry
        self._name = name
        self._signal_mask = _signal_mask()  # the creating thread's: every pool thread's
        self._local = threading.local()  # .worker: the _Worker of a pool thread
        # Guards the fields below, and every _Worker's fields.
        self._lock = threading.Lock()
        self._monitor_wakeup = threading.Condition(self._lock)
        self._backlog: deque[_Work] = deque()  # calls no thread has taken yet
        self._idle: list[_Worker] = []  # parked threads, the last parked on top
        self._busy: set[_Worker] = set()  # threads in a call
        self._returning: deque[_Worker] = deque()  # back from waiting(), waiting for room, in order
        self._threads: set[threading.Thread] = set()  # started and not yet left
        self._count = 0  # threads alive or asked for: what ``limit`` bounds
        self._running = 0  # workers RUNNING: with _unstarted, what ``max_running`` bounds
        self._unstarted = 0  # threads asked for and not yet taking work; each takes a call
        self._to_start = 0  # asked for while threads were starting threads; they start them
        self._starters = 0  # threads (or callers) starting threads right now
        self._started_total = 0  # for thread names
        self._monitor: threading.Thread | None = None  # presumes long calls waiting
        self._monitor_asleep = False  # the monitor sleeps until a call begins
        self._stopped = False

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def max_running(self) -> int:
        return self._max_running

    @property
    def thread_count(self) -> int:
        """Threads serving calls, alive or being started (the monitor is not one)."""
        with self._lock:
            return self._count

    def runs_on_this_thread(self) -> bool:
        """Whether the calling thread is one of this pool's."""
        return threading.current_thread() in self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a pool thread; its Future holds the outcome.

        Never waits for a thread to be free; waits for a thread to start at
        most once per burst.

        Raises:
            RuntimeError: the pool is stopped, or no thread can be started.
        """
        future: futures.Future[Any] = futures.Future()
        self._dispatch((future, fn, args, kwargs))
        return future

    def run_soon(self, fn: Callable[..., Any], /, *args: Any) -> None:
        """``submit`` without a Future, for callers that need no outcome (an
        exception ``fn`` raises is logged); it costs less.

        Raises:
            RuntimeError: the pool is stopped, or no thread can be started.
        """
        self._dispatch((None, fn, args, {}))

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside it, the pool thread calling it does not count as running:
        wrap waits on the network (or anything that holds no CPU), so that
        other calls run meanwhile. Outside a pool thread it does nothing."""
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is None:
            yield
            return
        with self._lock:
            # Not if the call is presumed waiting already (or waits, nested).
            counted = worker.state is _State.RUNNING
            if counted:
                worker.state = _State.WAITING
                self._running -= 1
                woken, start_one = self._fill()
        if counted:
            self._wake_and_start(woken, start_one)
        try:
            yield
        finally:
            if counted:
                self._return(worker)

    def _return(self, worker: _Worker) -> None:
        """Back from ``waiting()``: run again when there is room; until then,
        sleep (and hold no turn for the GIL) before the backlog's calls."""
        with self._lock:
            if self._running + self._unstarted < self._max_running and not self._returning:
                self._resume(worker)
                return
            worker.state = _State.RETURNING
            self._returning.append(worker)
        # Cannot hang: room is made whenever a running call ends, begins to
        # wait or is presumed waiting, and the first returning worker gets it
        # (_fill); stop() resumes them all.
        worker.wake.acquire()

    def _resume(self, worker: _Worker) -> None:
        """``worker``'s call runs again (the lock held)."""
        worker.state = _State.RUNNING
        worker.started = time.monotonic()  # patience counts from here
        self._running += 1

    def _dispatch(self, work: _Work) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"the {self._name} threads are stopped")
            self._backlog.append(work)
            woken, start_one = self._fill()
            if self._backlog and self._monitor is None and self._max_running < self._limit:
                self._start_monitor()
        self._wake_and_start(woken, start_one)

    def _fill(self, *, start_threads: bool = True) -> tuple[list[_Worker], bool]:
        """Give the room there is to the workers returning from a wait, then
        hand backlog calls to idle threads and (if ``start_threads``) ask for
        new ones (the lock held). Returns the workers to wake, and whether
        the caller must start a thread (see ``_ask_for_thread``)."""
        woken: list[_Worker] = []
        start_one = False
        while self._returning and self._running + self._unstarted < self._max_running:
            worker = self._returning.popleft()
            self._resume(worker)
            woken.append(worker)
        while (
            not self._returning
            and len(self._backlog) > self._unstarted
            and self._running + self._unstarted < self._max_running
        ):
            if self._idle:
                worker = self._idle.pop()
                worker.work = self._backlog.popleft()
                self._begin(worker)
                woken.append(worker)
                if start_threads:
                    self._ask_for_spare(worker)
            elif start_threads and self._count < self._limit:
                start_one = self._ask_for_thread() or start_one
            else:
                break
        return woken, start_one

    def _begin(self, worker: _Worker) -> None:
        """``worker`` begins a call (the lock held)."""
        worker.state = _State.RUNNING
        worker.started = time.monotonic()
        self._running += 1
        self._busy.add(worker)
        if self._monitor_asleep:
            self._monitor_asleep = False
            self._monitor_wakeup.notify()

    def _wake_and_start(self, woken: list[_Worker], start_one: bool) -> None:
        for worker in woken:
            worker.wake.release()
        if start_one:
            self._start_threads(only_if_alone=True)

    def _ask_for_thread(self) -> bool:
        """Count one more thread to start (the lock held); True if the caller
        must start it (no thread is starting threads), then counted as a starter.

        Every thread asked for is started: a starter leaves its loop only
        when none is left to start, under the lock, and whoever asks finds
        either a starter still in its loop or none (and becomes one).
        """
        self._count += 1
        self._unstarted += 1
        self._to_start += 1
        if self._starters:
            return False
        self._starters += 1
        return True

    def _ask_for_spare(self, worker: _Worker) -> None:
        """``worker`` has just taken a call: if that left no thread idle and
        none coming for a later call, ask for a spare, which ``worker``
        starts before its call (the lock held).

        So a caller that finds no idle thread seldom has to start one and
        wait for it to run (``Thread.start`` does): the server's loop would
        stall there, once for each thread a slow repository's calls need.
        The spare counts as a thread not yet taking work, so it takes the
        next call; its start delays only ``worker``'s call. At most one
        spare is wanted at a time: a burst asks for one beyond its calls.
        """
        if (
            self._idle
            or self._unstarted > len(self._backlog)
            or self._count >= self._limit
            or self._running + self._unstarted >= self._max_running
        ):
            return
        if not self._ask_for_thread():
            # Another starter is at it; ``worker`` joins in, so that a
            # caller starting threads stops after its first (only_if_alone).
            self._starters += 1
        worker.start_spare = True

    def _start_threads(self, *, only_if_alone: bool) -> None:
        """Start the threads asked for, as one of ``_starters``, until none is
        left to start; with ``only_if_alone``, stop after the first if other
        starters are at it.

        Raises:
            RuntimeError: the system refuses to start a thread and the pool
                has none left (the calls waiting for one have failed).
        """
        started_one = False
        while True:
            with self._lock:
                if (
                    self._stopped
                    or not self._to_start
                    or (started_one and only_if_alone and self._starters > 1)
                ):
                    self._forget_unstarted(self._to_start if self._stopped else 0)
                    self._starters -= 1
                    return
                self._to_start -= 1
                self._started_total += 1
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{self._started_total}", daemon=True
                )
                self._threads.add(thread)
            try:
                thread.start()
            except RuntimeError:  # the system refuses more threads
                with self._lock:
                    self._threads.discard(thread)
                    self._forget_unstarted(self._to_start + 1)
                    self._starters -= 1
                    stranded: list[_Work] = []
                    if self._count == 0:
                        stranded, self._backlog = list(self._backlog), deque()
                    # The room they held goes to the threads there are.
                    woken, _ = self._fill(start_threads=False)
                for other in woken:
                    other.wake.release()
                error = RuntimeError(f"cannot start a {self._name} thread")
                for future, *_ in stranded:
                    if future is not None and future.set_running_or_notify_cancel():
                        future.set_exception(error)
                if stranded:
                    raise error from None
                _logger.warning("cannot start more %s threads; the others keep serving", self._name)
                return
            started_one = True
            if self._count >= FUTEX_TABLE_WIDEN_AT:  # read without the lock: a hint is enough
                widen_futex_table()

    def _forget_unstarted(self, count: int) -> None:
        """Drop ``count`` threads asked for and never to be started (the lock held)."""
        self._to_start -= count
        self._count -= count
        self._unstarted -= count

    def _start_more(self) -> None:
        """A new thread's first act: join in starting the threads still asked
        for, so that a burst's threads start in a tree, not one after another."""
        with self._lock:
            if not self._to_start or self._stopped:
                return
            self._starters += 1
        self._start_threads(only_if_alone=False)

    def _start_monitor(self) -> None:
        """Start the thread that presumes long calls waiting (the lock held).

        Started under the lock: ``Thread.start`` only waits for the thread to
        exist, and the monitor's first act is to wait for this lock.
        """
        self._monitor = threading.Thread(target=self._watch_calls, name=f"{self._name}-monitor", daemon=True)
        self._threads.add(self._monitor)
        self._monitor.start()

    def stop(self, timeout: float | None = 0.0, *, cancel_futures: bool = False) -> None:
        """Refuse new calls, tell every thread to leave once its call is done,
        and wait for them up to ``timeout`` seconds (None: until they have).

        Calls already queued still run, unless ``cancel_futures``. Idempotent.
        """
        with self._lock:
            self._stopped = True
            parked, self._idle = self._idle, []
            for worker in parked:
                worker.leave = True
            # Their calls finish, whatever the bound: the pool is going away.
            returning, self._returning = list(self._returning), deque()
            for worker in returning:
                self._resume(worker)
            threads = list(self._threads)
            cancelled: list[_Work] = []
            if cancel_futures:
                cancelled, self._backlog = list(self._backlog), deque()
            self._monitor_wakeup.notify_all()
        for worker in parked + returning:
            worker.wake.release()
        for future, *_ in cancelled:
            if future is not None:
                future.cancel()
        deadline = Deadline(timeout)
        for thread in threads:
            # Not itself (stop() called from a pool thread), nor one a starter
            # has counted and not yet started (join would raise): that one
            # finds the pool stopped and leaves once it runs.
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(deadline.remaining())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``: ``stop()``, waiting without a limit if ``wait``."""
        self.stop(None if wait else 0.0, cancel_futures=cancel_futures)

    def _run(self) -> None:
        if self._signal_mask is not None:
            # A pool thread may be started from any thread, the server's
            # loop included (which blocks signals); the program's code runs
            # here, and a process it starts inherits the mask.
            signal.pthread_sigmask(signal.SIG_SETMASK, self._signal_mask)
        self._start_more()
        worker = _Worker()
        self._local.worker = worker
        with self._lock:
            self._unstarted -= 1
            work, returning = self._next_call(worker)
        while True:
            for other in returning:
                other.wake.release()
            if work is _LEFT:
                return
            if work is None:
                work, returning = self._wait_for_work(worker), []
                continue
            if worker.start_spare:
                worker.start_spare = False
                self._start_threads(only_if_alone=False)
            self._call(work)  # type: ignore[arg-type]
            with self._lock:
                self._end_call(worker)
                work, returning = self._next_call(worker)

    def _next_call(self, worker: _Worker) -> tuple[_Work | object | None, list[_Worker]]:
        """What ``worker`` does next, in the room there is (the lock held).

        The workers returning from a wait have the room first; they are
        returned, to be woken. Then ``worker`` takes the backlog's next call;
        or, with no room or no call, parks on the idle stack (None), or
        leaves the stopped pool (``_LEFT``).
        """
        returning: list[_Worker] = []
        while self._returning and self._running + self._unstarted < self._max_running:
            other = self._returning.popleft()
            self._resume(other)
            returning.append(other)
        if not self._returning and self._backlog and self._running + self._unstarted < self._max_running:
            self._begin(worker)
            work = self._backlog.popleft()
            self._ask_for_spare(worker)
            return work, returning
        if self._stopped:
            self._leave()
            return _LEFT, returning
        self._idle.append(worker)
        return None, returning

    def _end_call(self, worker: _Worker) -> None:
        """``worker``'s call is over (the lock held)."""
        if worker.state is _State.RUNNING:
            self._running -= 1
        worker.state = _State.IDLE
        self._busy.discard(worker)

    def _wait_for_work(self, worker: _Worker) -> _Work | object:
        """Sleep on the idle stack until handed a call; ``_LEFT`` once told to
        leave or expired (the thread has then left the pool)."""
        if not worker.wake.acquire(timeout=self._idle_expiry):
            with self._lock:
                if worker in self._idle:  # nobody took this thread: it leaves
                    self._idle.remove(worker)
                    self._leave()
                    return _LEFT
            # Taken just as it expired: cannot hang, whoever took it from the
            # idle stack (under the lock, checked above) releases it next.
            worker.wake.acquire()
        with self._lock:
            if worker.leave:
                self._leave()
                return _LEFT
            work, worker.work = worker.work, None
        return work

    def _leave(self) -> None:
        """This thread leaves the pool (the lock held)."""
        self._count -= 1
        self._threads.discard(threading.current_thread())

    def _watch_calls(self) -> None:
        """While calls wait in the backlog, presume the calls running longer
        than ``patience`` to be waiting, so that the backlog gets their turns.

        Looks every ``patience / 2`` while any call runs; with none, sleeps
        until one begins, and leaves after ``idle_expiry`` without any.
        """
        with self._lock:
            while not self._stopped:
                if not self._busy:
                    self._monitor_asleep = True
                    # Woken by the next call to begin (_begin), or by stop().
                    self._monitor_wakeup.wait(self._idle_expiry)
                    if self._monitor_asleep and not self._busy:
                        break  # idle that long: the next backlog starts a monitor again
                    continue
                if self._backlog:
                    now = time.monotonic()
                    for worker in self._busy:
                        if worker.state is _State.RUNNING and now - worker.started > self._patience:
                            worker.state = _State.PRESUMED_WAITING
                            self._running -= 1
                    woken, start_one = self._fill()
                    if woken or start_one:
                        self._lock.release()
                        try:
                            self._wake_and_start(woken, start_one)
                        finally:
                            self._lock.acquire()
                self._monitor_wakeup.wait(self._patience / 2)
            self._monitor_asleep = False
            self._monitor = None
            self._threads.discard(threading.current_thread())

    @staticmethod
    def _call(work: _Work) -> None:
        future, fn, args, kwargs = work
        if future is None:
            try:
                fn(*args, **kwargs)
            except BaseException:
                _logger.exception("a call on a pool thread failed")
            return
        if future.set_running_or_notify_cancel():
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
